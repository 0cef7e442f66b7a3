;; A wasm-task guest (ABI v1, docs/abi.md) whose setup hook always fails,
;; as a module with a missing configuration would: every worker refuses its
;; client with this message. The tests use it to check that the client
;; reports the message and does not fork workers in a loop.
(module
  (memory (export "memory") 1)
  (data (i32.const 64) "setup failed: the configuration file is missing")

  (func (export "wasm_task_abi_v1"))

  (func (export "wasm_task_alloc") (param $len i32) (result i32)
    (i32.const 1024))

  ;; Never called: no worker gets past its setup.
  (func (export "wasm_task_call") (param i32 i32 i32) (result i32)
    (call $reply (i32.const 2) (i32.const 0) (i32.const 0)))

  ;; Status 1 (error) with the message above.
  (func (export "wasm_task_setup") (result i32)
    (call $reply (i32.const 1) (i32.const 64) (i32.const 47)))

  ;; Fills the reply record at 32 (status, ptr, len) and returns its address.
  (func $reply (param $status i32) (param $ptr i32) (param $len i32) (result i32)
    (i32.store (i32.const 32) (local.get $status))
    (i32.store (i32.const 36) (local.get $ptr))
    (i32.store (i32.const 40) (local.get $len))
    (i32.const 32)))
