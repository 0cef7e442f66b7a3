;; Test guest: `bin n` replies with a MessagePack bin32 of n patterned bytes
;; (byte i = (i * 31 + n) & 0xff), 5 + n bytes in all: large results from
;; small requests.
(module
  (memory (export "memory") 2)
  (data (i32.const 288) "bin")
  (data (i32.const 320) "bin")

  (func (export "wasm_task_abi_v1"))

  (func (export "wasm_task_alloc") (param $len i32) (result i32)
    (if (i32.eqz (call $room (i32.add (i32.const 4096) (local.get $len))))
      (then (return (i32.const 0))))
    (i32.const 4096))

  (func (export "wasm_task_methods") (result i32)
    (call $reply (i32.const 0) (i32.const 320) (i32.const 3)))

  (func (export "wasm_task_call") (param $buf i32) (param $ml i32) (param $al i32) (result i32)
    (local $n i32) (local $i i32) (local $base i32)
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 288) (i32.const 3))
      (then
        (local.set $n (call $uint (i32.add (local.get $buf) (local.get $ml))))
        ;; Requests are written at 4096; results go above the largest one.
        (local.set $base (i32.const 0x100000))
        (if (i32.eqz (call $room (i32.add (i32.add (local.get $base) (i32.const 5)) (local.get $n))))
          (then (unreachable)))
        (i32.store8 (local.get $base) (i32.const 0xc6))
        (i32.store8 offset=1 (local.get $base) (i32.shr_u (local.get $n) (i32.const 24)))
        (i32.store8 offset=2 (local.get $base) (i32.shr_u (local.get $n) (i32.const 16)))
        (i32.store8 offset=3 (local.get $base) (i32.shr_u (local.get $n) (i32.const 8)))
        (i32.store8 offset=4 (local.get $base) (local.get $n))
        (local.set $i (i32.const 0))
        (block $done
          (loop $fill
            (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
            (i32.store8 offset=5 (i32.add (local.get $base) (local.get $i))
              (i32.add (i32.mul (local.get $i) (i32.const 31)) (local.get $n)))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $fill)))
        (return (call $reply (i32.const 0) (local.get $base) (i32.add (local.get $n) (i32.const 5))))))
    (call $reply (i32.const 2) (i32.const 0) (i32.const 0)))

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
        (br_if $done (i32.ge_u (local.get $i) (local.get $nl)))
        (if (i32.ne (i32.load8_u (i32.add (local.get $m) (local.get $i)))
                    (i32.load8_u (i32.add (local.get $n) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 1))

  (func $reply (param $status i32) (param $ptr i32) (param $len i32) (result i32)
    (i32.store (i32.const 32) (local.get $status))
    (i32.store (i32.const 36) (local.get $ptr))
    (i32.store (i32.const 40) (local.get $len))
    (i32.const 32)))
