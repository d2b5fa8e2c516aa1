package main

// The NATS services protocol ($SRV.PING, $SRV.INFO, $SRV.STATS, also
// .<name> and .<name>.<id>), as the Rust services answer it
// (common/src/micro.rs): `nats micro ls`, and `twopc ping <name>`, see this
// service and its endpoints' counts. Metadata is empty, as there.

import (
	"encoding/json"
	"math/rand"
	"time"

	"github.com/nats-io/nats.go"
)

const serviceVersion = "0.1.0"

type discovery struct {
	nc          *nats.Conn
	name, id    string
	description string
	started     string
	srv         *server
	subs        []*nats.Subscription
}

func newServiceID() string {
	const digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
	b := make([]byte, 22)
	for i := range b {
		b[i] = digits[rand.Intn(len(digits))]
	}
	return string(b)
}

func (d *discovery) endpoints(stats bool) []map[string]interface{} {
	out := []map[string]interface{}{}
	for _, e := range d.srv.endpoints {
		m := map[string]interface{}{"name": e.name, "subject": e.subject, "queue_group": e.queue}
		if stats {
			e.mu.Lock()
			total := e.processing.Nanoseconds()
			avg := int64(0)
			if e.requests > 0 {
				avg = total / int64(e.requests)
			}
			m["num_requests"], m["num_errors"], m["last_error"] = e.requests, e.errors, e.lastError
			m["processing_time"], m["average_processing_time"] = total, avg
			e.mu.Unlock()
		} else {
			m["metadata"] = map[string]string{}
		}
		out = append(out, m)
	}
	return out
}

func (d *discovery) answer(verb string) []byte {
	m := map[string]interface{}{"name": d.name, "id": d.id, "version": serviceVersion, "metadata": map[string]string{}}
	switch verb {
	case "PING":
		m["type"] = "io.nats.micro.v1.ping_response"
	case "INFO":
		m["type"] = "io.nats.micro.v1.info_response"
		m["description"] = d.description
		m["endpoints"] = d.endpoints(false)
	default:
		m["type"] = "io.nats.micro.v1.stats_response"
		m["started"] = d.started
		m["endpoints"] = d.endpoints(true)
	}
	b, _ := json.Marshal(m)
	return b
}

func (d *discovery) start() error {
	d.id = newServiceID()
	d.started = time.Now().UTC().Format("2006-01-02T15:04:05.000Z")
	for _, verb := range []string{"PING", "INFO", "STATS"} {
		verb := verb
		for _, subject := range []string{"$SRV." + verb, "$SRV." + verb + "." + d.name, "$SRV." + verb + "." + d.name + "." + d.id} {
			sub, err := d.nc.Subscribe(subject, func(m *nats.Msg) {
				if m.Reply != "" {
					_ = d.nc.Publish(m.Reply, d.answer(verb))
				}
			})
			if err != nil {
				return err
			}
			d.subs = append(d.subs, sub)
		}
	}
	return nil
}

func (d *discovery) stop() {
	for _, s := range d.subs {
		_ = s.Unsubscribe()
	}
}
