;; Hostile guest: runs forever, in wasm (`spin`) or in a host call (`sleep`,
;; a WASI poll_oneoff on a 10-minute relative clock). See README.md.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 32) "\c0")
  (data (i32.const 256) "ok")
  (data (i32.const 264) "spin")
  (data (i32.const 272) "sleep")

  (func (export "wasm_task_abi_v1"))

  (func (export "wasm_task_alloc") (param $len i32) (result i32)
    (if (i32.eqz (call $room (i32.add (i32.const 4096) (local.get $len))))
      (then (return (i32.const 0))))
    (i32.const 4096))

  (func (export "wasm_task_call") (param $buf i32) (param $ml i32) (param $al i32) (result i32)
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 256) (i32.const 2))
      (then (return (call $nil))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 264) (i32.const 4))
      (then (loop $forever (br $forever))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 272) (i32.const 5))
      (then (call $sleep_minutes (i64.const 10)) (return (call $nil))))
    (call $reply (i32.const 2) (i32.const 0) (i32.const 0)))

  ;; One subscription at 512: a relative timeout on the monotonic clock.
  (func $sleep_minutes (param $minutes i64)
    (i64.store (i32.const 512) (i64.const 0))          ;; userdata
    (i32.store8 (i32.const 520) (i32.const 0))         ;; tag: clock
    (i32.store (i32.const 528) (i32.const 1))          ;; clock id: monotonic
    (i64.store (i32.const 536)                         ;; timeout in ns
      (i64.mul (local.get $minutes) (i64.const 60_000_000_000)))
    (i64.store (i32.const 544) (i64.const 0))          ;; precision
    (i32.store16 (i32.const 552) (i32.const 0))        ;; flags: relative
    (drop (call $poll_oneoff (i32.const 512) (i32.const 640) (i32.const 1) (i32.const 700))))

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
