//! What a service writes to become a participant: its [`Resource`] — how
//! to read an operation, hold what it needs, and apply or release it —
//! and helpers for its SQL.

use rusqlite::Connection;
use twopc_schemas::protocol::TxId;
use twopc_schemas::{ClientName, Code, ParticipantName};

/// A refusal to prepare: the vote's code and message.
pub type Refusal = (Code, String);

/// What a participant service manages. All three methods run on the
/// database's writer thread inside the transaction's SQLite transaction; the
/// library records the branch state in the same SQLite transaction, so the
/// resource change and the protocol state are durable together.
pub trait Resource: Send + Sync + 'static {
    /// The participant's own operation: what a branch at it asks for, as
    /// the JSON the client wrote in the branch's `op`.
    type Op: serde::de::DeserializeOwned + Send + Sync + 'static;
    /// The participant's name (`wallet`, `order`): subjects and logs.
    fn name(&self) -> ParticipantName;
    /// Schema of the resource's own tables, applied in order once each.
    fn migrations(&self) -> &'static [&'static str];
    /// Reads and checks an operation: the branch's op as the coordinator
    /// sent it (canonical JSON). `Err` is a no vote (`bad_message`), and
    /// nothing is written. The default parses the JSON into `Self::Op`;
    /// add the operation's own limits here.
    fn parse_op(&self, op: &str) -> Result<Self::Op, String> {
        serde_json::from_str(op).map_err(|e| format!("{} cannot read the op: {e}", self.name()))
    }
    /// Reads back an operation this participant stored when it prepared
    /// (it parsed then, so it parses now; rows written by an earlier
    /// version may have another shape, which an override reads).
    fn stored_op(&self, op: &str) -> Self::Op {
        self.parse_op(op)
            .unwrap_or_else(|e| panic!("a stored op reads back: {e}"))
    }
    /// Checks `op` and holds what it needs. `Ok(Err(refusal))` means a no
    /// vote, and the resource must have written nothing. `client` is the
    /// client that submitted the transaction.
    fn hold(
        &self,
        conn: &Connection,
        tx: TxId,
        client: &ClientName,
        op: &Self::Op,
    ) -> rusqlite::Result<Result<(), Refusal>>;
    /// Makes a held operation permanent (decision commit).
    fn apply(&self, conn: &Connection, tx: TxId, op: &Self::Op) -> rusqlite::Result<()>;
    /// Releases what `hold` took (decision abort).
    fn release(&self, conn: &Connection, tx: TxId, op: &Self::Op) -> rusqlite::Result<()>;
}

/// Reads a transaction id column (a 16-byte BLOB).
pub fn tx_column(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<TxId> {
    let bytes: Vec<u8> = r.get(i)?;
    TxId::from_slice(&bytes).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Blob, Box::new(e))
    })
}

/// A money amount or quantity as an SQLite INTEGER. Messages are validated
/// on decode ([`twopc_schemas::protocol::Message::validate`]), which keeps
/// every value far inside i64; one that is not is refused as a database
/// error rather than wrapped into a negative number.
pub fn sql_int(value: impl Into<u64>) -> rusqlite::Result<i64> {
    i64::try_from(value.into()).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// A stored money amount or quantity read back. The tables' CHECK
/// constraints keep them at least 0, so a negative one means a corrupt file.
pub fn stored_u64(value: i64) -> u64 {
    u64::try_from(value).expect("CHECK constraints keep stored amounts and quantities >= 0")
}
