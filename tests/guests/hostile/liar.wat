;; Hostile guest: lies in the ABI. Out-of-range reply pointers and lengths
;; (`reply_oob`, `reply_wrap`, `negative_len`), a reply record outside memory
;; or misaligned (`record_oob`, `record_unaligned`), an unknown status
;; (`bad_status`), and host imports called with pointers outside memory
;; (`log_oob`, `trap_message_oob`). See README.md.
(module
  (import "wasm_task" "log" (func $log (param i32 i32 i32 i32 i32)))
  (import "wasm_task" "trap_message" (func $trap_message (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 32) "\c0")
  (data (i32.const 256) "ok")
  (data (i32.const 288) "reply_oob")
  (data (i32.const 320) "reply_wrap")
  (data (i32.const 352) "negative_len")
  (data (i32.const 384) "record_oob")
  (data (i32.const 416) "record_unaligned")
  (data (i32.const 448) "bad_status")
  (data (i32.const 480) "log_oob")
  (data (i32.const 512) "trap_message_oob")

  (func (export "wasm_task_abi_v1"))

  (func (export "wasm_task_alloc") (param $len i32) (result i32)
    (if (i32.eqz (call $room (i32.add (i32.const 4096) (local.get $len))))
      (then (return (i32.const 0))))
    (i32.const 4096))

  (func (export "wasm_task_call") (param $buf i32) (param $ml i32) (param $al i32) (result i32)
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 256) (i32.const 2))
      (then (return (call $nil))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 288) (i32.const 9))
      (then (return (call $reply (i32.const 0) (i32.const 0x7fff0000) (i32.const 16)))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 320) (i32.const 10))
      (then (return (call $reply (i32.const 0) (i32.const 0xfffffff0) (i32.const 0x20)))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 352) (i32.const 12))
      (then (return (call $reply (i32.const 0) (i32.const 32) (i32.const -1)))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 384) (i32.const 10))
      (then (return (i32.const 0x7ffffff0))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 416) (i32.const 16))
      (then (drop (call $reply (i32.const 0) (i32.const 32) (i32.const 1)))
            (i64.store (i32.const 65) (i64.load (i32.const 16)))
            (i32.store (i32.const 73) (i32.load (i32.const 24)))
            (return (i32.const 65))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 448) (i32.const 10))
      (then (return (call $reply (i32.const 7) (i32.const 32) (i32.const 1)))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 480) (i32.const 7))
      (then (call $log (i32.const 3) (i32.const 0) (i32.const 2) (i32.const 0x7fff0000) (i32.const 100))
            (return (call $nil))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 512) (i32.const 16))
      (then (call $trap_message (i32.const 16) (i32.const -1)) (unreachable)))
    (call $reply (i32.const 2) (i32.const 0) (i32.const 0)))


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
