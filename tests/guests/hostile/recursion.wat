;; Hostile guest: recursion. `recurse` never stops; `depth n` nests n calls
;; and answers n, to probe the configured stack size. See README.md.
(module
  (memory (export "memory") 1)
  (data (i32.const 32) "\c0")
  (data (i32.const 256) "ok")
  (data (i32.const 288) "recurse")
  (data (i32.const 320) "depth")

  (func (export "wasm_task_abi_v1"))

  (func (export "wasm_task_alloc") (param $len i32) (result i32)
    (if (i32.eqz (call $room (i32.add (i32.const 4096) (local.get $len))))
      (then (return (i32.const 0))))
    (i32.const 4096))

  (func (export "wasm_task_call") (param $buf i32) (param $ml i32) (param $al i32) (result i32)
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 256) (i32.const 2))
      (then (return (call $nil))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 288) (i32.const 7))
      (then (drop (call $down (i32.const 0))) (return (call $nil))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 320) (i32.const 5))
      (then (return (call $int (call $depth (call $uint (i32.add (local.get $buf) (local.get $ml))))))))
    (call $reply (i32.const 2) (i32.const 0) (i32.const 0)))

  ;; The addition after the call keeps it from being a tail call.
  (func $down (param $n i32) (result i32)
    (i32.add (call $down (i32.add (local.get $n) (i32.const 1))) (i32.const 1)))

  (func $depth (param $n i32) (result i32)
    (if (result i32) (i32.eqz (local.get $n))
      (then (i32.const 0))
      (else (i32.add (call $depth (i32.sub (local.get $n) (i32.const 1))) (i32.const 1)))))

  ;; A signed 32-bit MessagePack integer at 40.
  (func $int (param $v i32) (result i32)
    (i32.store8 (i32.const 40) (i32.const 0xd2))
    (i32.store8 (i32.const 41) (i32.shr_u (local.get $v) (i32.const 24)))
    (i32.store8 (i32.const 42) (i32.shr_u (local.get $v) (i32.const 16)))
    (i32.store8 (i32.const 43) (i32.shr_u (local.get $v) (i32.const 8)))
    (i32.store8 (i32.const 44) (local.get $v))
    (call $reply (i32.const 0) (i32.const 40) (i32.const 5)))

  ;; The unsigned MessagePack integer at $p (fixint, uint8, uint16, uint32).
  (func $uint (param $p i32) (result i32)
    (local $t i32)
    (local.set $t (i32.load8_u (local.get $p)))
    (if (i32.lt_u (local.get $t) (i32.const 0x80)) (then (return (local.get $t))))
    (if (i32.eq (local.get $t) (i32.const 0xcc))
      (then (return (i32.load8_u offset=1 (local.get $p)))))
    (if (i32.eq (local.get $t) (i32.const 0xcd))
      (then (return (i32.or (i32.shl (i32.load8_u offset=1 (local.get $p)) (i32.const 8))
                            (i32.load8_u offset=2 (local.get $p))))))
    (if (i32.eq (local.get $t) (i32.const 0xce))
      (then (return (i32.or
        (i32.or (i32.shl (i32.load8_u offset=1 (local.get $p)) (i32.const 24))
                (i32.shl (i32.load8_u offset=2 (local.get $p)) (i32.const 16)))
        (i32.or (i32.shl (i32.load8_u offset=3 (local.get $p)) (i32.const 8))
                (i32.load8_u offset=4 (local.get $p)))))))
    (unreachable))


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
