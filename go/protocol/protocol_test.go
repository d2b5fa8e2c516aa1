package protocol

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
)

// vectorsDir is protocol/vectors at the repository root. (A relative path,
// opened as is: the test runs in the package's folder, and under the GOPATH
// symlink only the kernel's view of "..", not a lexical one, is right.)
func vectorsDir() string {
	if d := os.Getenv("TWOPC_VECTORS_DIR"); d != "" {
		return d
	}
	return "../../protocol/vectors"
}

type vector struct {
	Name    string                 `json:"name"`
	Message string                 `json:"message"`
	Hex     string                 `json:"hex"`
	Fields  map[string]interface{} `json:"fields"`
	Error   string                 `json:"error"`
	Why     string                 `json:"why"`
}

func readVectors(t *testing.T, dir string) []vector {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("reading %s: %v", dir, err)
	}
	var names []string
	for _, e := range entries {
		if !e.IsDir() && strings.HasSuffix(e.Name(), ".json") {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	var out []vector
	for _, n := range names {
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			t.Fatal(err)
		}
		var v vector
		d := json.NewDecoder(bytes.NewReader(b))
		d.UseNumber()
		if err := d.Decode(&v); err != nil {
			t.Fatalf("%s: %v", n, err)
		}
		out = append(out, v)
	}
	return out
}

func str(t *testing.T, f map[string]interface{}, k string) string {
	t.Helper()
	s, ok := f[k].(string)
	if !ok {
		t.Fatalf("field %s missing or not a string in %v", k, f)
	}
	return s
}

func txOf(t *testing.T, f map[string]interface{}) TxID {
	t.Helper()
	tx, err := ParseTxID(str(t, f, "tx"))
	if err != nil {
		t.Fatal(err)
	}
	return tx
}

func codeOf(t *testing.T, f map[string]interface{}) Code {
	t.Helper()
	c, ok := CodeByName(str(t, f, "code"))
	if !ok {
		t.Fatalf("unknown code %v", f["code"])
	}
	return c
}

func decisionOf(t *testing.T, f map[string]interface{}) Decision {
	t.Helper()
	switch str(t, f, "decision") {
	case "commit":
		return Commit
	case "abort":
		return Abort
	}
	t.Fatalf("decision %v", f["decision"])
	return 0
}

func number(t *testing.T, v interface{}) int64 {
	t.Helper()
	n, err := v.(json.Number).Int64()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// fromFields builds the vector's message from its fields.
func fromFields(t *testing.T, v vector) Message {
	f := v.Fields
	switch v.Message {
	case "Prepare":
		return Prepare{Tx: txOf(t, f), Client: str(t, f, "client"), Op: []byte(str(t, f, "op"))}
	case "Vote":
		if str(t, f, "vote") == "yes" {
			return Vote{Yes: true}
		}
		return Vote{Code: codeOf(t, f), Message: str(t, f, "message")}
	case "Decide":
		return Decide{Tx: txOf(t, f), Decision: decisionOf(t, f)}
	case "DecideReply":
		if str(t, f, "reply") == "ack" {
			return DecideReply{Ack: true}
		}
		return DecideReply{Code: codeOf(t, f), Message: str(t, f, "message")}
	case "DecisionQuery":
		return DecisionQuery{Tx: txOf(t, f), Participant: str(t, f, "participant")}
	case "DecisionReply":
		if str(t, f, "reply") == "decided" {
			return DecisionReply{Decided: true, Tx: txOf(t, f), Decision: decisionOf(t, f)}
		}
		return DecisionReply{Code: codeOf(t, f), Message: str(t, f, "message")}
	case "Unsupported":
		u := Unsupported{Message: str(t, f, "message")}
		for _, s := range f["speaks"].([]interface{}) {
			m := s.(map[string]interface{})
			u.Speaks = append(u.Speaks, Speaks{Kind: uint8(number(t, m["kind"])), Version: uint16(number(t, m["version"]))})
		}
		return u
	}
	t.Fatalf("%s: unknown message %s", v.Name, v.Message)
	return nil
}

// toFields is the decoded message as the vector's fields (JSON numbers as
// json.Number, as the vectors are read).
func toFields(m Message) map[string]interface{} {
	num := func(n int) json.Number { return json.Number(itoa(n)) }
	switch m := m.(type) {
	case Prepare:
		return map[string]interface{}{"tx": m.Tx.String(), "client": m.Client, "op": string(m.Op)}
	case Vote:
		if m.Yes {
			return map[string]interface{}{"vote": "yes"}
		}
		return map[string]interface{}{"vote": "no", "code": m.Code.String(), "message": m.Message}
	case Decide:
		return map[string]interface{}{"tx": m.Tx.String(), "decision": m.Decision.String()}
	case DecideReply:
		if m.Ack {
			return map[string]interface{}{"reply": "ack"}
		}
		return map[string]interface{}{"reply": "rejected", "code": m.Code.String(), "message": m.Message}
	case DecisionQuery:
		return map[string]interface{}{"tx": m.Tx.String(), "participant": m.Participant}
	case DecisionReply:
		if m.Decided {
			return map[string]interface{}{"reply": "decided", "tx": m.Tx.String(), "decision": m.Decision.String()}
		}
		return map[string]interface{}{"reply": "rejected", "code": m.Code.String(), "message": m.Message}
	case Unsupported:
		speaks := []interface{}{}
		for _, s := range m.Speaks {
			speaks = append(speaks, map[string]interface{}{"kind": num(int(s.Kind)), "version": num(int(s.Version))})
		}
		return map[string]interface{}{"message": m.Message, "speaks": speaks}
	}
	return nil
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}

// decodeAs decodes b as the named message.
func decodeAs(name string, b []byte) (Message, error) {
	switch name {
	case "Prepare":
		return DecodePrepare(b)
	case "Vote":
		return DecodeVote(b)
	case "Decide":
		return DecodeDecide(b)
	case "DecideReply":
		return DecodeDecideReply(b)
	case "DecisionQuery":
		return DecodeDecisionQuery(b)
	case "DecisionReply":
		return DecodeDecisionReply(b)
	case "Unsupported":
		return DecodeUnsupported(b)
	}
	panic("unknown message " + name)
}

func TestEveryValidVectorDecodesToItsFieldsAndEncodesToItsBytes(t *testing.T) {
	kinds := map[string]bool{}
	vs := readVectors(t, vectorsDir())
	for _, v := range vs {
		b, err := hex.DecodeString(v.Hex)
		if err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		got, err := decodeAs(v.Message, b)
		if err != nil {
			t.Errorf("%s: %v", v.Name, err)
			continue
		}
		if fields := toFields(got); !reflect.DeepEqual(fields, v.Fields) {
			t.Errorf("%s: decoded fields %v, want %v", v.Name, fields, v.Fields)
		}
		built := fromFields(t, v)
		if enc := hex.EncodeToString(Encode(built)); enc != v.Hex {
			t.Errorf("%s: encoded %s, want %s", v.Name, enc, v.Hex)
		}
		if !reflect.DeepEqual(got, built) {
			t.Errorf("%s: decoded %#v, built %#v", v.Name, got, built)
		}
		kinds[v.Message] = true
	}
	if len(kinds) != 7 {
		t.Errorf("vectors cover %d message kinds, want 7: %v", len(kinds), kinds)
	}
	t.Logf("%d valid vectors", len(vs))
}

func TestEveryInvalidVectorIsRefusedAsItSays(t *testing.T) {
	vs := readVectors(t, filepath.Join(vectorsDir(), "invalid"))
	if len(vs) < 8 {
		t.Fatalf("only %d invalid vectors", len(vs))
	}
	for _, v := range vs {
		b, err := hex.DecodeString(v.Hex)
		if err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		_, err = decodeAs(v.Message, b)
		if err == nil {
			t.Errorf("%s: decoded, want refused as %s (%s)", v.Name, v.Error, v.Why)
			continue
		}
		de := err.(*DecodeError)
		if de.Class != v.Error {
			t.Errorf("%s: refused as %s (%v), want %s (%s)", v.Name, de.Class, de, v.Error, v.Why)
		}
	}
	t.Logf("%d invalid vectors", len(vs))
}

func TestCodesMatchCodesJSON(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(vectorsDir(), "..", "codes.json"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	if err := json.Unmarshal(b, &names); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(names, CodeNames) {
		t.Fatalf("codes.json %v\nCodeNames %v", names, CodeNames)
	}
	for i, n := range names {
		c, ok := CodeByName(n)
		if !ok || int(c) != i {
			t.Errorf("%s: index %d, want %d", n, c, i)
		}
		enc := Encode(Vote{Code: c})
		if enc[3] != byte(i) {
			t.Errorf("%s encodes as %d", n, enc[3])
		}
	}
	// One past the last code does not decode.
	if _, err := DecodeVote([]byte{1, 2, 1, byte(len(names)), 0}); err == nil {
		t.Error("a code past the table decoded")
	}
}

func TestVarintsFollowPostcard(t *testing.T) {
	for _, c := range []struct {
		v    uint64
		want string
	}{{0, "00"}, {1, "01"}, {127, "7f"}, {128, "8001"}, {300, "ac02"}, {16383, "ff7f"}, {16384, "808001"}, {65535, "ffff03"}} {
		if got := hex.EncodeToString(appendVarint(nil, c.v)); got != c.want {
			t.Errorf("%d: %s, want %s", c.v, got, c.want)
		}
	}
	u16 := func(h string) (uint16, error) {
		b, _ := hex.DecodeString(h)
		r := &reader{b: b}
		v, err := r.u16()
		if err == nil && r.rest() != 0 {
			t.Errorf("%s: %d bytes left", h, r.rest())
		}
		return v, err
	}
	for h, want := range map[string]uint16{"ffff03": 65535, "8100": 1, "818000": 1} {
		if v, err := u16(h); err != nil || v != want {
			t.Errorf("u16 %s: %d %v, want %d", h, v, err, want)
		}
	}
	for _, bad := range []string{"ffff04", "808080", "80", ""} {
		if v, err := u16(bad); err == nil {
			t.Errorf("u16 %s decoded as %d", bad, v)
		}
	}
	// A version that is not 1 or 2 (here 2, as three bytes) is not read as
	// another kind's layout: an unsupported Vote.
	if _, err := DecodeVote([]byte{0x82, 0x80, 0x00, 2, 0}); err == nil || !err.(*DecodeError).IsUnsupported() {
		t.Errorf("vote version 2: %v", err)
	}
	// The long form of version 1 is version 1, as postcard reads it.
	if m, err := DecodeVote([]byte{0x81, 0x00, 2, 0}); err != nil || !m.Yes {
		t.Errorf("long version 1: %v %v", m, err)
	}
}

func TestStrictDecoding(t *testing.T) {
	tx := mustTx(t, "01930000-0000-7000-8000-00000000002a")
	good := Encode(Prepare{Tx: tx, Client: "web", Op: []byte(`{"a":1}`)})
	if _, err := DecodePrepare(good); err != nil {
		t.Fatal(err)
	}
	class := func(b []byte) string {
		_, err := DecodePrepare(b)
		if err == nil {
			return ""
		}
		return err.(*DecodeError).Class
	}
	if c := class(append(append([]byte{}, good...), 0)); c != ClassTrailing {
		t.Errorf("trailing: %s", c)
	}
	for n := 0; n < len(good); n++ {
		if c := class(good[:n]); c != ClassBody {
			t.Errorf("cut at %d: %q", n, c)
		}
	}
	big := make([]byte, MaxMessageBytes+1)
	if c := class(big); c != ClassTooLarge {
		t.Errorf("too large: %s", c)
	}
	// Op exactly at the limit is fine; a client name that breaks the rule,
	// or a string that is not UTF-8, is not.
	ok := Encode(Prepare{Tx: tx, Client: "web", Op: bytes.Repeat([]byte("1"), MaxOpBytes)})
	if c := class(ok); c != "" {
		t.Errorf("op at the limit: %s", c)
	}
	for _, name := range []string{"", "Web", "1web", "decision", "a.b", strings.Repeat("a", 33), "\xff"} {
		if c := class(Encode(Prepare{Tx: tx, Client: name})); c != ClassBody {
			t.Errorf("client %q: %q", name, c)
		}
	}
	if _, err := DecodeDecisionQuery(Encode(DecisionQuery{Tx: tx, Participant: "x-1_y"})); err != nil {
		t.Error(err)
	}
	// Unknown variants of each enum.
	for name, b := range map[string][]byte{
		"vote":           {1, 2, 2},
		"decide reply":   {1, 4, 2},
		"decision reply": {1, 6, 2},
	} {
		if _, err := decodeAs(map[string]string{"vote": "Vote", "decide reply": "DecideReply", "decision reply": "DecisionReply"}[name], b); err == nil || err.(*DecodeError).Class != ClassBody {
			t.Errorf("%s variant 2: %v", name, err)
		}
	}
}

func TestUnsupportedAnswersListWhatIsSpoken(t *testing.T) {
	_, err := DecodePrepare([]byte{1, 1})
	de := err.(*DecodeError)
	if !de.IsUnsupported() || de.Version != 1 || de.Kind != 1 {
		t.Fatalf("%#v", de)
	}
	u := UnsupportedFor(de)
	back, err := DecodeUnsupported(Encode(u))
	if err != nil || !reflect.DeepEqual(back, u) {
		t.Fatalf("%v %v", back, err)
	}
	want := []Speaks{{1, 2}, {2, 1}, {3, 1}, {4, 1}, {5, 1}, {6, 1}, {7, 1}}
	if !reflect.DeepEqual(u.Speaks, want) {
		t.Errorf("speaks %v", u.Speaks)
	}
	if v, k, ok := Peek([]byte{2, 1}); !ok || v != 2 || k != 1 {
		t.Errorf("peek %d %d %v", v, k, ok)
	}
}

func mustTx(t *testing.T, s string) TxID {
	tx, err := ParseTxID(s)
	if err != nil {
		t.Fatal(err)
	}
	return tx
}

const now = int64(1_700_000_000_000)

func TestTheWindowRule(t *testing.T) {
	w, err := NewTxWindow(1_000, 5_000, 500)
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][3]int64{{1_000, 1_500, 500}, {0, 5_000, 0}, {1_000, 5_000, -1}, {3_000, 5_000, 0}} {
		if _, err := NewTxWindow(bad[0], bad[1], bad[2]); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
	code := func(expired bool, r *Refused) string {
		if r != nil {
			return r.Code.String()
		}
		if expired {
			return "expired"
		}
		return "within"
	}
	v4 := mustTx(t, "01930000-0000-4000-8000-00000000002a")
	for _, bad := range []TxID{{}, v4, mustTx(t, "ffffffff-ffff-ffff-ffff-ffffffffffff")} {
		if c := code(w.CheckTx(bad, now)); c != "bad_tx_id" {
			t.Errorf("%s: %s", bad, c)
		}
	}
	otherVariant := NewV7(now)
	otherVariant[8] = 0xc0
	if c := code(w.CheckTx(otherVariant, now)); c != "bad_tx_id" {
		t.Errorf("variant: %s", c)
	}
	for _, c := range []struct {
		at   int64
		want string
	}{{now + 500, "within"}, {now + 501, "tx_in_future"}, {now - 1_000, "within"}, {now - 1_001, "expired"}, {0, "expired"}} {
		if got := code(w.CheckTx(NewV7(c.at), now)); got != c.want {
			t.Errorf("tx at now%+d: %s, want %s", c.at-now, got, c.want)
		}
	}
	if ms, ok := StartedAtMs(mustTx(t, "01930000-0000-7000-8000-00000000002a")); !ok || ms != 0x0193_0000_0000 {
		t.Errorf("started at %d %v", ms, ok)
	}
	// A decision for a stored branch is applied whatever the clock says.
	future := Decide{Tx: NewV7(now + 3_600_000)}
	if c := code(future.Check(now, w, false)); c != "tx_in_future" {
		t.Errorf("future, not stored: %s", c)
	}
	if c := code(future.Check(now, w, true)); c != "within" {
		t.Errorf("future, stored: %s", c)
	}
	if c := code((&Decide{Tx: v4}).Check(now, w, true)); c != "bad_tx_id" {
		t.Errorf("v4 stored: %s", c)
	}
	if w.PastRetention(NewV7(now-5_000), now) || !w.PastRetention(NewV7(now-5_001), now) {
		t.Error("retention edge")
	}
	if NewV7(now).String()[14] != '7' {
		t.Error("NewV7 is not version 7")
	}
}

func TestNames(t *testing.T) {
	for _, ok := range []string{"wallet", "order", "a", "ledger-eu_2", strings.Repeat("x", 32), "shipping"} {
		if err := CheckName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "Wallet", "1wallet", "wal.let", "wal*", ">", "wal let", "é", strings.Repeat("x", 33), "decision"} {
		if CheckName(bad) == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// PROTOCOL.md's code table says what codes.json and Code.Status say.
func TestTheDocumentsCodeTable(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join(vectorsDir(), "..", "..", "PROTOCOL.md"))
	if err != nil {
		t.Skipf("no PROTOCOL.md next to the vectors: %v", err)
	}
	text := string(doc)
	start, end := strings.Index(text, "## 6. Codes"), strings.Index(text, "## 7. ")
	if start < 0 || end < start {
		t.Fatal("PROTOCOL.md has no section 6 before section 7")
	}
	seen := 0
	for _, line := range strings.Split(text[start:end], "\n") {
		var index, status int
		var name string
		cells := strings.Split(line, "|")
		if len(cells) < 5 {
			continue
		}
		if _, err := fmt.Sscanf(strings.TrimSpace(cells[1]), "%d", &index); err != nil {
			continue
		}
		name = strings.Trim(strings.TrimSpace(cells[2]), "`")
		if _, err := fmt.Sscanf(strings.TrimSpace(cells[3]), "%d", &status); err != nil {
			continue
		}
		c, ok := CodeByName(name)
		if !ok || int(c) != index || c.Status() != status {
			t.Errorf("PROTOCOL.md: %d %s %d; the code table says %d, status %d", index, name, status, c, c.Status())
		}
		seen++
	}
	if seen != len(CodeNames) {
		t.Errorf("PROTOCOL.md lists %d codes, want %d", seen, len(CodeNames))
	}
}

// Every byte example of PROTOCOL.md section 5 is a golden vector's bytes.
func TestTheDocumentsExamplesAreVectors(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join(vectorsDir(), "..", "..", "PROTOCOL.md"))
	if err != nil {
		t.Skipf("no PROTOCOL.md next to the vectors: %v", err)
	}
	known := map[string]bool{}
	for _, dir := range []string{vectorsDir(), filepath.Join(vectorsDir(), "invalid")} {
		for _, v := range readVectors(t, dir) {
			known[v.Hex] = true
		}
	}
	text := string(doc)
	text = text[strings.Index(text, "## 5. Messages"):strings.Index(text, "## 6. Codes")]
	tx := "10" + "0193000000007000800000000000002a"
	clean := func(s string) string {
		return strings.NewReplacer("TX", tx, " ", "", "|", "", "`", "").Replace(s)
	}
	examples := 0
	for _, line := range strings.Split(text, "\n") {
		var candidates []string
		if len(line) > 5 && line[2:5] == " | " {
			candidates = append(candidates, line) // a code block's bytes
		}
		for _, part := range strings.Split(line, "`")[1:] {
			if strings.HasPrefix(part, "01 | ") || strings.HasPrefix(part, "02 | ") {
				candidates = append(candidates, part) // inline bytes
			}
		}
		for _, c := range candidates {
			h := clean(c)
			if _, err := hex.DecodeString(h); err != nil {
				t.Errorf("not hex: %q", c)
				continue
			}
			if !known[h] {
				t.Errorf("PROTOCOL.md's %q is no vector", c)
			}
			examples++
		}
	}
	if examples < 11 {
		t.Errorf("only %d examples found", examples)
	}
	t.Logf("%d examples", examples)
}
