//! The wallet and the order service: two participants written on the SDK
//! (`twopc-participant`), which only say how to hold, apply and release
//! their resources. They are the SDK's examples, and the two branches of a
//! purchase.

pub mod order;
pub mod wallet;
