;; Hostile guest: memory and table bombs. `grow_to_4gib` asks for the whole
;; 32-bit address space at once and answers what memory.grow returned;
;; `grow_until_refused` grows a page at a time and traps once refused;
;; `grow_table` asks for ten million table slots and answers what table.grow
;; returned. See README.md.
(module
  (memory (export "memory") 1)
  (table $t 1 funcref)
  (data (i32.const 32) "\c0")
  (data (i32.const 256) "ok")
  (data (i32.const 288) "grow_to_4gib")
  (data (i32.const 320) "grow_until_refused")
  (data (i32.const 352) "grow_table")

  (func (export "wasm_task_abi_v1"))

  (func (export "wasm_task_alloc") (param $len i32) (result i32)
    (if (i32.eqz (call $room (i32.add (i32.const 4096) (local.get $len))))
      (then (return (i32.const 0))))
    (i32.const 4096))

  (func (export "wasm_task_call") (param $buf i32) (param $ml i32) (param $al i32) (result i32)
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 256) (i32.const 2))
      (then (return (call $nil))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 288) (i32.const 12))
      (then (return (call $int (memory.grow (i32.sub (i32.const 65536) (memory.size)))))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 320) (i32.const 18))
      (then
        (loop $more
          (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
        (unreachable)))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 352) (i32.const 10))
      (then (return (call $int (table.grow $t (ref.null func) (i32.const 10_000_000))))))
    (call $reply (i32.const 2) (i32.const 0) (i32.const 0)))

  ;; A signed 32-bit MessagePack integer at 40.
  (func $int (param $v i32) (result i32)
    (i32.store8 (i32.const 40) (i32.const 0xd2))
    (i32.store8 (i32.const 41) (i32.shr_u (local.get $v) (i32.const 24)))
    (i32.store8 (i32.const 42) (i32.shr_u (local.get $v) (i32.const 16)))
    (i32.store8 (i32.const 43) (i32.shr_u (local.get $v) (i32.const 8)))
    (i32.store8 (i32.const 44) (local.get $v))
    (call $reply (i32.const 0) (i32.const 40) (i32.const 5)))


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
