//! What a chaos run found, for people (`Report::text`) and as JSON.

use std::collections::BTreeMap;

use serde::Serialize;

/// The result of one invariant.
#[derive(Debug, Clone, Serialize)]
pub struct InvariantResult {
    pub name: &'static str,
    pub ok: bool,
    pub violations: usize,
    /// The first few violations, for people.
    pub examples: Vec<String>,
}

/// What a chaos run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub duration_s: f64,
    /// Logical purchases (one request id each).
    pub attempted: u64,
    pub committed: u64,
    pub aborted: u64,
    /// No reply after every retry: may be either, must be one.
    pub unknown_to_client: u64,
    /// Attempts repeated with the same request id after a timeout.
    pub retries: u64,
    /// Error replies (`busy`, ...), retried.
    pub error_replies: u64,
    /// Answered purchases sent again with the same request id and body.
    pub resends: u64,
    /// Re-sends answered with a transaction other than the key's first
    /// answer (each one also violates `request_id_client_view`).
    pub resends_different_tx: u64,
    /// Abort reasons seen by clients.
    pub abort_codes: BTreeMap<String, u64>,
    /// The three-branch transactions (wallet, order, shipping), in a run
    /// with the shipping participant; the figures above are the purchases.
    pub transactions: Option<TxCounts>,
    pub faults: BTreeMap<String, u64>,
    /// Faults of a kind with variants, by variant (`duplicate_fresh`,
    /// `duplicate_rolling_sigterm`, `duplicate_rolling_sigkill`).
    pub fault_variants: BTreeMap<String, u64>,
    /// How long each ownership step of the duplicate faults took, in ms
    /// (polled every 50 ms): `refusal` (a fresh duplicate's start to its
    /// exit), `drain` (SIGTERM to the original's exit),
    /// `takeover_after_sigterm` and `takeover_after_sigkill` (the
    /// original's stop to the duplicate's `OWNER:`), `handback` (SIGTERM
    /// to the duplicate until the original's `OWNER:`).
    pub ownership_ms: BTreeMap<String, Vec<u64>>,
    /// Services that exited without the nemesis asking (restarted).
    pub unexpected_exits: u64,
    pub heal_to_quiescent_ms: Option<u64>,
    pub invariants: Vec<InvariantResult>,
    pub data_dir: String,
    pub ok: bool,
}

/// What clients were told of their three-branch transactions.
#[derive(Debug, Clone, Serialize)]
pub struct TxCounts {
    pub attempted: u64,
    pub committed: u64,
    pub aborted: u64,
    pub unknown_to_client: u64,
    pub abort_codes: BTreeMap<String, u64>,
}

impl Report {
    /// A human-readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "chaos run: seed {} · {:.1} s · data in {}\n",
            self.seed, self.duration_s, self.data_dir
        ));
        s.push_str(&format!(
            "purchases: {} attempted, {} committed, {} aborted, {} unknown to the client ({} retries, {} error replies)\n",
            self.attempted, self.committed, self.aborted, self.unknown_to_client, self.retries, self.error_replies
        ));
        if let Some(t) = &self.transactions {
            let codes: Vec<String> = t
                .abort_codes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            s.push_str(&format!(
                "three-branch transactions (wallet, order, shipping): {} attempted, {} committed, {} aborted, {} unknown to the client (abort reasons: {})\n",
                t.attempted, t.committed, t.aborted, t.unknown_to_client, codes.join(", ")
            ));
        }
        s.push_str(&format!(
            "re-sends of answered {}: {} ({} answered with a different tx)\n",
            if self.transactions.is_some() {
                "purchases and transactions"
            } else {
                "purchases"
            },
            self.resends,
            self.resends_different_tx
        ));
        let codes: Vec<String> = self
            .abort_codes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        s.push_str(&format!("abort reasons: {}\n", codes.join(", ")));
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        s.push_str(&format!(
            "faults: {} (unexpected exits: {})\n",
            faults.join(", "),
            self.unexpected_exits
        ));
        if !self.fault_variants.is_empty() {
            let variants: Vec<String> = self
                .fault_variants
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            s.push_str(&format!("fault variants: {}\n", variants.join(", ")));
        }
        for (step, ms) in &self.ownership_ms {
            let mut sorted = ms.clone();
            sorted.sort_unstable();
            if let (Some(max), Some(median)) = (sorted.last(), sorted.get(sorted.len() / 2)) {
                s.push_str(&format!(
                    "  ownership {step:<24} {}x, median {median} ms, max {max} ms\n",
                    sorted.len()
                ));
            }
        }
        match self.heal_to_quiescent_ms {
            Some(ms) => s.push_str(&format!("heal to quiescence: {ms} ms\n")),
            None => s.push_str("heal to quiescence: NOT REACHED\n"),
        }
        for inv in &self.invariants {
            s.push_str(&format!(
                "  {:<28} {}\n",
                inv.name,
                if inv.ok {
                    "ok".to_string()
                } else {
                    format!("VIOLATED ({})", inv.violations)
                }
            ));
            for e in &inv.examples {
                s.push_str(&format!("      {e}\n"));
            }
        }
        s.push_str(if self.ok {
            "RESULT: ok\n"
        } else {
            "RESULT: VIOLATIONS FOUND\n"
        });
        s
    }
}

pub(super) fn result(name: &'static str, violations: Vec<String>) -> InvariantResult {
    InvariantResult {
        name,
        ok: violations.is_empty(),
        violations: violations.len(),
        examples: violations.into_iter().take(5).collect(),
    }
}
