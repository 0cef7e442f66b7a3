;; A wasm-task guest (ABI v1, docs/abi.md) written by hand, without the Rust
;; SDK: `echo` replies with its arguments as they came; other methods get 2.
;; Below 1024: constants and the reply record. Requests are bump-allocated
;; from 1024 up; the heap resets when no buffer is still with the host, so a
;; host-owned buffer is never handed out twice, and a reply (which points into
;; its request) stays intact until the next export call, as the ABI requires.
(module
  (memory (export "memory") 1)

  (global $heap_base i32 (i32.const 1024))
  (global $next (mut i32) (i32.const 1024))
  ;; Buffers allocated but not yet passed back by wasm_task_call.
  (global $with_host (mut i32) (i32.const 0))

  (data (i32.const 16) "echo")
  (data (i32.const 64) "this guest only has `echo`")

  (func (export "wasm_task_abi_v1"))

  (func (export "wasm_task_alloc") (param $len i32) (result i32)
    (local $ptr i32) (local $end i64) (local $size i64)
    (if (i32.eqz (global.get $with_host))
      (then (global.set $next (global.get $heap_base))))
    (local.set $ptr (global.get $next))
    (local.set $end
      (i64.add (i64.extend_i32_u (local.get $ptr)) (i64.extend_i32_u (local.get $len))))
    (local.set $size (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)))
    (if (i64.gt_u (local.get $end) (local.get $size))
      (then
        ;; Grow by whole pages, rounding up; 0 tells the host we are out of memory.
        (if (i32.eq (i32.const -1)
                    (memory.grow (i32.wrap_i64 (i64.shr_u
                      (i64.add (i64.sub (local.get $end) (local.get $size)) (i64.const 0xffff))
                      (i64.const 16)))))
          (then (return (i32.const 0))))))
    (global.set $next (i32.wrap_i64 (local.get $end)))
    (global.set $with_host (i32.add (global.get $with_host) (i32.const 1)))
    (local.get $ptr))

  (func (export "wasm_task_call") (param $buf i32) (param $method_len i32) (param $args_len i32)
    (result i32)
    (if (global.get $with_host)
      (then (global.set $with_host (i32.sub (global.get $with_host) (i32.const 1)))))
    (block $unknown
      ;; Two steps: the 4-byte load is only safe once the length is known.
      (br_if $unknown (i32.ne (local.get $method_len) (i32.const 4)))
      (br_if $unknown (i32.ne (i32.load (local.get $buf)) (i32.load (i32.const 16))))
      (return (call $reply (i32.const 0) (i32.add (local.get $buf) (local.get $method_len))
                           (local.get $args_len))))
    (call $reply (i32.const 2) (i32.const 64) (i32.const 26)))

  (func (export "wasm_task_methods") (result i32)
    (call $reply (i32.const 0) (i32.const 16) (i32.const 4)))

  ;; Fills the reply record at 32 (status, ptr, len) and returns its address.
  (func $reply (param $status i32) (param $ptr i32) (param $len i32) (result i32)
    (i32.store (i32.const 32) (local.get $status))
    (i32.store (i32.const 36) (local.get $ptr))
    (i32.store (i32.const 40) (local.get $len))
    (i32.const 32)))
