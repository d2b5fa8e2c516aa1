//! With the services' panic hook installed (any panic aborts the process),
//! a panic inside `contained` code is returned as an error and the process
//! goes on. (Its own test binary: the hook is process-wide.)

use twopc_common::contain::contained;

#[test]
fn the_abort_hook_spares_contained_code() {
    twopc_common::logging::abort_on_panic();
    for i in 0..3 {
        let e = contained("hold", || -> () { panic!("bug {i}") }).unwrap_err();
        assert_eq!(e.message, format!("bug {i}"));
    }
}
