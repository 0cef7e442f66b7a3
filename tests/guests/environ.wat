;; A wasm-task guest (ABI v1) that shows what WASI gives it, for the tests of
;; the sandbox settings: `environ` and `args` answer the raw NUL-separated
;; strings as bytes, `clock` answers [realtime, monotonic, monotonic] in
;; nanoseconds, `random` answers 16 bytes from random_get. Same frame as
;; the guests in hostile/ (see hostile/README.md).
(module
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 32) "\c0")
  (data (i32.const 256) "ok")
  (data (i32.const 288) "environ")
  (data (i32.const 320) "args")
  (data (i32.const 352) "clock")
  (data (i32.const 384) "random")

  (func (export "wasm_task_abi_v1"))

  (func (export "wasm_task_alloc") (param $len i32) (result i32)
    (if (i32.eqz (call $room (i32.add (i32.const 4096) (local.get $len))))
      (then (return (i32.const 0))))
    (i32.const 4096))

  (func (export "wasm_task_call") (param $buf i32) (param $ml i32) (param $al i32) (result i32)
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 256) (i32.const 2))
      (then (return (call $nil))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 288) (i32.const 7))
      (then
        (drop (call $environ_sizes_get (i32.const 600) (i32.const 604)))
        (call $strings_room)
        (drop (call $environ_get (i32.const 2048) (i32.const 8192)))
        (return (call $bytes (i32.load (i32.const 604))))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 320) (i32.const 4))
      (then
        (drop (call $args_sizes_get (i32.const 600) (i32.const 604)))
        (call $strings_room)
        (drop (call $args_get (i32.const 2048) (i32.const 8192)))
        (return (call $bytes (i32.load (i32.const 604))))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 352) (i32.const 5))
      (then
        (i32.store8 (i32.const 1024) (i32.const 0x93))
        (call $time (i32.const 0) (i32.const 1025))
        (call $time (i32.const 1) (i32.const 1034))
        (call $time (i32.const 1) (i32.const 1043))
        (return (call $reply (i32.const 0) (i32.const 1024) (i32.const 28)))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 384) (i32.const 6))
      (then
        (i32.store8 (i32.const 1024) (i32.const 0xc4))
        (i32.store8 (i32.const 1025) (i32.const 16))
        (drop (call $random_get (i32.const 1026) (i32.const 16)))
        (return (call $reply (i32.const 0) (i32.const 1024) (i32.const 18)))))
    (call $reply (i32.const 2) (i32.const 0) (i32.const 0)))

  ;; Strings go to 8192, after a 3-byte bin16 header at 8189.
  (func $strings_room
    (if (i32.eqz (call $room (i32.add (i32.const 8192) (i32.load (i32.const 604)))))
      (then (unreachable))))

  (func $bytes (param $len i32) (result i32)
    (i32.store8 (i32.const 8189) (i32.const 0xc5))
    (i32.store8 (i32.const 8190) (i32.shr_u (local.get $len) (i32.const 8)))
    (i32.store8 (i32.const 8191) (local.get $len))
    (call $reply (i32.const 0) (i32.const 8189) (i32.add (i32.const 3) (local.get $len))))

  ;; Clock $id's time as a MessagePack uint64 at $at (9 bytes).
  (func $time (param $id i32) (param $at i32)
    (local $t i64) (local $i i32)
    (drop (call $clock_time_get (local.get $id) (i64.const 1) (i32.const 640)))
    (local.set $t (i64.load (i32.const 640)))
    (i32.store8 (local.get $at) (i32.const 0xcf))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (i32.const 8)))
        (i64.store8 (i32.add (i32.add (local.get $at) (i32.const 1)) (local.get $i))
          (i64.shr_u (local.get $t) (i64.extend_i32_u (i32.sub (i32.const 56)
            (i32.mul (local.get $i) (i32.const 8))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next))))


  ;; ---- the common frame (README.md) ----
  (func $room (param $end i32) (result i32)
    (local $have i32)
    (local.set $have (i32.shl (memory.size) (i32.const 16)))
    (if (i32.le_u (local.get $end) (local.get $have)) (then (return (i32.const 1))))
    (i32.ne (i32.const -1)
      (memory.grow (i32.shr_u
        (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 0xffff))
        (i32.const 16)))))

  (func $is (param $m i32) (param $ml i32) (param $n i32) (param $nl i32) (result i32)
    (local $i i32)
    (if (i32.ne (local.get $ml) (local.get $nl)) (then (return (i32.const 0))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $ml)))
        (if (i32.ne (i32.load8_u (i32.add (local.get $m) (local.get $i)))
                    (i32.load8_u (i32.add (local.get $n) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 1))

  (func $reply (param $status i32) (param $ptr i32) (param $len i32) (result i32)
    (i32.store (i32.const 16) (local.get $status))
    (i32.store (i32.const 20) (local.get $ptr))
    (i32.store (i32.const 24) (local.get $len))
    (i32.const 16))

  (func $nil (result i32)
    (call $reply (i32.const 0) (i32.const 32) (i32.const 1))))
