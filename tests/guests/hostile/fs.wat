;; Hostile guest: raw WASI file calls with crafted paths, no libc in between.
;; Arguments are MessagePack arrays (fd, path...) naming a preopened
;; directory by descriptor (3 is the first --dir). Every method answers
;; (errno, count, bytes):
;;   read (fd, path)            open following symlinks, read up to 200 bytes
;;   create (fd, path)          create or truncate, write "pwned"
;;   remove (fd, path)          unlink a file
;;   symlink (fd, target, name) make a symlink `name` pointing at `target`
;;   open_dir (fd, n)           open "." n times, keeping all open; count = opened
;; See README.md.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_symlink"
    (func $path_symlink (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_unlink_file"
    (func $path_unlink_file (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 32) "\c0")
  (data (i32.const 48) "pwned")
  (data (i32.const 56) ".")
  (data (i32.const 256) "ok")
  (data (i32.const 288) "read")
  (data (i32.const 320) "create")
  (data (i32.const 352) "remove")
  (data (i32.const 384) "symlink")
  (data (i32.const 416) "open_dir")
  ;; The last string read by $str.
  (global $sp (mut i32) (i32.const 0))
  (global $sl (mut i32) (i32.const 0))

  (func (export "wasm_task_abi_v1"))

  (func (export "wasm_task_alloc") (param $len i32) (result i32)
    (if (i32.eqz (call $room (i32.add (i32.const 4096) (local.get $len))))
      (then (return (i32.const 0))))
    (i32.const 4096))

  (func (export "wasm_task_call") (param $buf i32) (param $ml i32) (param $al i32) (result i32)
    (local $arg i32) (local $fd i32) (local $next i32)
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 256) (i32.const 2))
      (then (return (call $nil))))
    ;; Every other method takes an array whose first element is a descriptor.
    (local.set $arg (i32.add (local.get $buf) (local.get $ml)))
    (local.set $fd (i32.load8_u offset=1 (local.get $arg)))
    (local.set $next (i32.add (local.get $arg) (i32.const 2)))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 288) (i32.const 4))
      (then (drop (call $str (local.get $next))) (return (call $read (local.get $fd)))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 320) (i32.const 6))
      (then (drop (call $str (local.get $next))) (return (call $create (local.get $fd)))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 352) (i32.const 6))
      (then
        (drop (call $str (local.get $next)))
        (return (call $answer
          (call $path_unlink_file (local.get $fd) (global.get $sp) (global.get $sl))
          (i32.const 0) (i32.const 0)))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 384) (i32.const 7))
      (then (return (call $symlink (local.get $fd) (local.get $next)))))
    (if (call $is (local.get $buf) (local.get $ml) (i32.const 416) (i32.const 8))
      (then (return (call $open_dirs (local.get $fd) (call $uint (local.get $next))))))
    (call $reply (i32.const 2) (i32.const 0) (i32.const 0)))

  (func $read (param $fd i32) (result i32)
    (local $errno i32) (local $file i32)
    (local.set $errno (call $path_open (local.get $fd) (i32.const 1)
      (global.get $sp) (global.get $sl) (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0)
      (i32.const 600)))
    (if (local.get $errno) (then (return (call $answer (local.get $errno) (i32.const 0) (i32.const 0)))))
    (local.set $file (i32.load (i32.const 600)))
    ;; Data goes right after the answer's 9-byte header at 1024 (see $answer).
    (i32.store (i32.const 608) (i32.const 1033))
    (i32.store (i32.const 612) (i32.const 200))
    (local.set $errno (call $fd_read (local.get $file) (i32.const 608) (i32.const 1) (i32.const 616)))
    (drop (call $fd_close (local.get $file)))
    (call $answer (local.get $errno) (i32.load (i32.const 616)) (i32.load (i32.const 616))))

  (func $create (param $fd i32) (result i32)
    (local $errno i32) (local $file i32)
    ;; oflags: create | truncate; rights: fd_write.
    (local.set $errno (call $path_open (local.get $fd) (i32.const 0)
      (global.get $sp) (global.get $sl) (i32.const 9) (i64.const 64) (i64.const 0) (i32.const 0)
      (i32.const 600)))
    (if (local.get $errno) (then (return (call $answer (local.get $errno) (i32.const 0) (i32.const 0)))))
    (local.set $file (i32.load (i32.const 600)))
    (i32.store (i32.const 608) (i32.const 48))
    (i32.store (i32.const 612) (i32.const 5))
    (local.set $errno (call $fd_write (local.get $file) (i32.const 608) (i32.const 1) (i32.const 616)))
    (drop (call $fd_close (local.get $file)))
    (call $answer (local.get $errno) (i32.load (i32.const 616)) (i32.const 0)))

  (func $symlink (param $fd i32) (param $p i32) (result i32)
    (local $target i32) (local $target_len i32)
    (local.set $p (call $str (local.get $p)))
    (local.set $target (global.get $sp))
    (local.set $target_len (global.get $sl))
    (drop (call $str (local.get $p)))
    (call $answer
      (call $path_symlink (local.get $target) (local.get $target_len)
        (local.get $fd) (global.get $sp) (global.get $sl))
      (i32.const 0) (i32.const 0)))

  (func $open_dirs (param $fd i32) (param $n i32) (result i32)
    (local $opened i32) (local $errno i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $opened) (local.get $n)))
        ;; oflags: directory; rights: fd_readdir.
        (local.set $errno (call $path_open (local.get $fd) (i32.const 0)
          (i32.const 56) (i32.const 1) (i32.const 2) (i64.const 0x4000) (i64.const 0) (i32.const 0)
          (i32.const 600)))
        (br_if $done (local.get $errno))
        (local.set $opened (i32.add (local.get $opened) (i32.const 1)))
        (br $next)))
    (call $answer (local.get $errno) (local.get $opened) (i32.const 0)))

  ;; Answers (errno, count, bytes) with the bytes already at 1033: a fixarray
  ;; of 3, errno as a fixint, count as a uint32, a bin8 header.
  (func $answer (param $errno i32) (param $count i32) (param $len i32) (result i32)
    (i32.store8 (i32.const 1024) (i32.const 0x93))
    (i32.store8 (i32.const 1025) (local.get $errno))
    (i32.store8 (i32.const 1026) (i32.const 0xce))
    (i32.store8 (i32.const 1027) (i32.shr_u (local.get $count) (i32.const 24)))
    (i32.store8 (i32.const 1028) (i32.shr_u (local.get $count) (i32.const 16)))
    (i32.store8 (i32.const 1029) (i32.shr_u (local.get $count) (i32.const 8)))
    (i32.store8 (i32.const 1030) (local.get $count))
    (i32.store8 (i32.const 1031) (i32.const 0xc4))
    (i32.store8 (i32.const 1032) (local.get $len))
    (call $reply (i32.const 0) (i32.const 1024) (i32.add (i32.const 9) (local.get $len))))

  ;; Reads the MessagePack string (fixstr or str8) at $p into $sp/$sl and
  ;; returns the offset just past it.
  (func $str (param $p i32) (result i32)
    (local $t i32)
    (local.set $t (i32.load8_u (local.get $p)))
    (if (i32.eq (i32.and (local.get $t) (i32.const 0xe0)) (i32.const 0xa0))
      (then
        (global.set $sl (i32.and (local.get $t) (i32.const 31)))
        (global.set $sp (i32.add (local.get $p) (i32.const 1))))
      (else
        (if (i32.ne (local.get $t) (i32.const 0xd9)) (then (unreachable)))
        (global.set $sl (i32.load8_u offset=1 (local.get $p)))
        (global.set $sp (i32.add (local.get $p) (i32.const 2)))))
    (i32.add (global.get $sp) (global.get $sl)))

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
