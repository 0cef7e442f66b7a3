//! The client's socket i/o under pressure, from the attack round on its
//! unix-socket writes: full sockets, stopped and killed workers, calls from
//! other runtimes, no descriptor to spare. A test binary of its own, since
//! these tests count the process's descriptors and change its limit.

#[path = "../e2e/harness.rs"]
#[allow(dead_code)]
mod harness;
mod io;
