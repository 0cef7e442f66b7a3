//! The reply record the daemon reads after every export that returns one.
//!
//! The record and its bytes live in one buffer per thread (a wasm guest has
//! one thread), reused by every call: the ABI only asks them to stay put
//! until the next export call, and reuse saves an allocation per call.

use std::cell::{Cell, RefCell};

/// The outcome of a call, as the ABI numbers it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// The reply bytes are the result, one MessagePack value.
    Ok = 0,
    /// The call failed in an orderly way; the bytes are a UTF-8 message.
    Error = 1,
    /// There is no method of that name; the bytes are a UTF-8 message.
    UnknownMethod = 2,
}

/// The 12-byte record whose address an export returns.
#[derive(Debug)]
#[repr(C, align(4))]
struct Record {
    status: Cell<u32>,
    ptr: Cell<u32>,
    len: Cell<u32>,
}

thread_local! {
    static RECORD: Record = const {
        Record { status: Cell::new(0), ptr: Cell::new(0), len: Cell::new(0) }
    };
    static BYTES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `fill` on the (cleared) reply buffer and publishes what it wrote.
///
/// Returns the address of the record for the daemon. The buffer is taken out
/// of its slot while `fill` runs, so guest code running inside `fill` can do
/// anything, even trigger another reply, without a borrow conflict.
pub(crate) fn publish(fill: impl FnOnce(&mut Vec<u8>) -> Status) -> i32 {
    let mut bytes = BYTES.take();
    bytes.clear();
    let status = fill(&mut bytes);

    RECORD.with(|record| {
        record.status.set(status as u32);
        record.ptr.set(wasm_address(bytes.as_ptr()));
        record.len.set(bytes.len() as u32);
        BYTES.set(bytes);
        wasm_address(record as *const Record as *const u8) as i32
    })
}

/// An address as the ABI passes it.
///
/// Exact on wasm32, where addresses are 32 bits. Natively the value is
/// meaningless, but native builds only exist to compile and unit-test.
fn wasm_address(ptr: *const u8) -> u32 {
    ptr as usize as u32
}

/// The status and bytes of the last reply published on this thread.
#[cfg(test)]
pub(crate) fn last() -> (u32, Vec<u8>) {
    let status = RECORD.with(|record| record.status.get());
    let bytes = BYTES.with_borrow(|bytes| bytes.clone());
    (status, bytes)
}

#[cfg(test)]
mod tests {
    use std::mem;

    use super::*;

    #[test]
    fn publish_records_status_and_bytes() {
        publish(|out| {
            out.extend_from_slice(b"no such thing");
            Status::UnknownMethod
        });
        assert_eq!(last(), (2, b"no such thing".to_vec()));
    }

    #[test]
    fn each_reply_starts_from_an_empty_buffer() {
        publish(|out| {
            out.extend_from_slice(b"first, longer reply");
            Status::Error
        });
        publish(|out| {
            out.push(0xc0);
            Status::Ok
        });
        assert_eq!(last(), (0, vec![0xc0]));
    }

    #[test]
    fn record_length_matches_the_buffer() {
        publish(|out| {
            out.extend_from_slice(&[1, 2, 3]);
            Status::Ok
        });
        assert_eq!(RECORD.with(|record| record.len.get()), 3);
        assert_eq!(mem::size_of::<Record>(), 12);
    }
}
