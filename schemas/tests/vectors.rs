//! The protocol's golden vectors (`protocol/vectors`), which every
//! implementation's tests read (the Go participant's too): each valid
//! vector decodes to its fields and its fields encode to its bytes; each
//! invalid one is refused with the error class it names.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use twopc_schemas::protocol::{
    decode, encode, Decide, DecideReply, Decision, DecisionQuery, DecisionReply, DecodeError,
    Message, Prepare, Speaks, Unsupported, Vote,
};
use twopc_schemas::{ClientName, Code, ParticipantName};
use uuid::Uuid;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/vectors")
}

fn read(dir: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str()
        .unwrap_or_else(|| panic!("field {k} in {v}"))
        .to_owned()
}

fn code(v: &Value) -> Code {
    Code::parse(&s(v, "code")).expect("a code name")
}

fn decision(v: &Value) -> Decision {
    match s(v, "decision").as_str() {
        "commit" => Decision::Commit,
        "abort" => Decision::Abort,
        d => panic!("decision {d}"),
    }
}

fn tx(v: &Value) -> Uuid {
    Uuid::parse_str(&s(v, "tx")).unwrap()
}

/// The vector's fields as the message, and the message back as fields.
trait Fields: Message + PartialEq + std::fmt::Debug {
    fn from_fields(v: &Value) -> Self;
    fn to_fields(&self) -> Value;
}

impl Fields for Prepare {
    fn from_fields(v: &Value) -> Self {
        Prepare {
            tx: tx(v),
            client: ClientName::new(s(v, "client")).unwrap(),
            op: s(v, "op").into_bytes(),
        }
    }
    fn to_fields(&self) -> Value {
        json!({"tx": self.tx.to_string(), "client": self.client.as_str(),
               "op": String::from_utf8(self.op.clone()).unwrap()})
    }
}

impl Fields for Vote {
    fn from_fields(v: &Value) -> Self {
        match s(v, "vote").as_str() {
            "yes" => Vote::Yes,
            _ => Vote::No {
                code: code(v),
                message: s(v, "message"),
            },
        }
    }
    fn to_fields(&self) -> Value {
        match self {
            Vote::Yes => json!({"vote": "yes"}),
            Vote::No { code, message } => {
                json!({"vote": "no", "code": code.as_str(), "message": message})
            }
        }
    }
}

impl Fields for Decide {
    fn from_fields(v: &Value) -> Self {
        Decide {
            tx: tx(v),
            decision: decision(v),
        }
    }
    fn to_fields(&self) -> Value {
        json!({"tx": self.tx.to_string(), "decision": self.decision.as_str()})
    }
}

impl Fields for DecideReply {
    fn from_fields(v: &Value) -> Self {
        match s(v, "reply").as_str() {
            "ack" => DecideReply::Ack,
            _ => DecideReply::Rejected {
                code: code(v),
                message: s(v, "message"),
            },
        }
    }
    fn to_fields(&self) -> Value {
        match self {
            DecideReply::Ack => json!({"reply": "ack"}),
            DecideReply::Rejected { code, message } => {
                json!({"reply": "rejected", "code": code.as_str(), "message": message})
            }
        }
    }
}

impl Fields for DecisionQuery {
    fn from_fields(v: &Value) -> Self {
        DecisionQuery {
            tx: tx(v),
            participant: ParticipantName::new(s(v, "participant")).unwrap(),
        }
    }
    fn to_fields(&self) -> Value {
        json!({"tx": self.tx.to_string(), "participant": self.participant.as_str()})
    }
}

impl Fields for DecisionReply {
    fn from_fields(v: &Value) -> Self {
        match s(v, "reply").as_str() {
            "decided" => DecisionReply::Decided {
                tx: tx(v),
                decision: decision(v),
            },
            _ => DecisionReply::Rejected {
                code: code(v),
                message: s(v, "message"),
            },
        }
    }
    fn to_fields(&self) -> Value {
        match self {
            DecisionReply::Decided { tx, decision } => json!({"reply": "decided",
                "tx": tx.to_string(), "decision": decision.as_str()}),
            DecisionReply::Rejected { code, message } => {
                json!({"reply": "rejected", "code": code.as_str(), "message": message})
            }
        }
    }
}

impl Fields for Unsupported {
    fn from_fields(v: &Value) -> Self {
        Unsupported {
            message: s(v, "message"),
            speaks: v["speaks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| Speaks {
                    kind: k["kind"].as_u64().unwrap() as u8,
                    version: k["version"].as_u64().unwrap() as u16,
                })
                .collect(),
        }
    }
    fn to_fields(&self) -> Value {
        json!({"message": self.message, "speaks": self.speaks.iter()
            .map(|k| json!({"kind": k.kind, "version": k.version})).collect::<Vec<_>>()})
    }
}

fn round_trip<M: Fields>(v: &Value) {
    let name = s(v, "name");
    let bytes = hex(&s(v, "hex"));
    let decoded: M = decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(decoded.to_fields(), v["fields"], "{name}: decoded fields");
    let built = M::from_fields(&v["fields"]);
    assert_eq!(
        to_hex(&encode(&built)),
        s(v, "hex"),
        "{name}: encoded bytes"
    );
    assert_eq!(decoded, built, "{name}");
}

fn refused<M: Message + std::fmt::Debug>(v: &Value) -> DecodeError {
    decode::<M>(&hex(&s(v, "hex"))).expect_err(&s(v, "name"))
}

#[test]
fn every_valid_vector_decodes_to_its_fields_and_encodes_to_its_bytes() {
    let vectors = read(&dir());
    let mut kinds = std::collections::BTreeSet::new();
    for v in &vectors {
        let message = s(v, "message");
        match message.as_str() {
            "Prepare" => round_trip::<Prepare>(v),
            "Vote" => round_trip::<Vote>(v),
            "Decide" => round_trip::<Decide>(v),
            "DecideReply" => round_trip::<DecideReply>(v),
            "DecisionQuery" => round_trip::<DecisionQuery>(v),
            "DecisionReply" => round_trip::<DecisionReply>(v),
            "Unsupported" => round_trip::<Unsupported>(v),
            m => panic!("vector {} names unknown message {m}", s(v, "name")),
        }
        kinds.insert(message);
    }
    // Every message kind has at least one vector.
    assert_eq!(kinds.len(), 7, "{kinds:?}");
}

#[test]
fn every_invalid_vector_is_refused_as_it_says() {
    let vectors = read(&dir().join("invalid"));
    assert!(vectors.len() >= 8);
    for v in &vectors {
        let err = match s(v, "message").as_str() {
            "Prepare" => refused::<Prepare>(v),
            "Vote" => refused::<Vote>(v),
            "Decide" => refused::<Decide>(v),
            "DecideReply" => refused::<DecideReply>(v),
            "DecisionQuery" => refused::<DecisionQuery>(v),
            "DecisionReply" => refused::<DecisionReply>(v),
            "Unsupported" => refused::<Unsupported>(v),
            m => panic!("unknown message {m}"),
        };
        let class = match &err {
            e if e.is_unsupported() => "unsupported",
            DecodeError::Trailing(_) => "trailing",
            DecodeError::Body(_) => "body",
            DecodeError::Invalid(_) => "invalid",
            DecodeError::TooLarge(_) => "too_large",
            _ => unreachable!(),
        };
        assert_eq!(class, s(v, "error"), "{}: {err}", s(v, "name"));
    }
}

#[test]
fn code_indexes_are_listed_for_other_languages() {
    // PROTOCOL.md's code table: postcard writes a code as its index.
    let table: Value =
        serde_json::from_slice(&std::fs::read(dir().join("../codes.json")).unwrap()).unwrap();
    let table = table.as_array().unwrap();
    for (i, name) in table.iter().enumerate() {
        let code = Code::parse(name.as_str().unwrap()).unwrap();
        let bytes = encode(&Vote::No {
            code,
            message: String::new(),
        });
        assert_eq!(bytes[3] as usize, i, "{name} is index {i}");
    }
    // And nothing is missing: the next index does not decode.
    let past = encode(&Vote::No {
        code: Code::Busy,
        message: String::new(),
    });
    let mut past = past.clone();
    past[3] = table.len() as u8;
    assert!(
        decode::<Vote>(&past).is_err(),
        "codes.json lists every code"
    );
}
