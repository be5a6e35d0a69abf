//! fnlet-probe: runs inside a sandbox and reports what it can see and do.
//!
//! `fnlet-probe escape HOST_PID HOST_PORT` tries every door an attacker who has read bubblewrap's
//! and runc's CVEs would try, and prints one line per attempt:
//! `ATTEMPT <name>: BLOCKED|OPEN: <detail>`. The test asserts each one is BLOCKED.
//! Other commands exercise limits: `spin SECS`, `alloc MIB`, `forkbomb`, `filltmp`.

#![allow(clippy::missing_safety_doc)]

use std::ffi::CString;
use std::io::Write;
use std::time::{Duration, Instant};

type Attempt = Result<String, String>; // Ok: blocked (how), Err: open (what happened)
type Door = (&'static str, Box<dyn Fn() -> Attempt>);

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errname(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// A syscall result that must fail with one of `ok` errnos.
fn must_fail(ret: libc::c_long, ok: &[i32]) -> Attempt {
    if ret >= 0 {
        return Err(format!("succeeded (returned {ret})"));
    }
    let e = errno();
    if ok.contains(&e) {
        Ok(errname(e))
    } else {
        Err(format!("failed with unexpected {}", errname(e)))
    }
}

fn c(s: &str) -> CString {
    CString::new(s).expect("static path")
}

fn open_fails(path: &str, flags: i32, ok: &[i32]) -> Attempt {
    // SAFETY: path is NUL-terminated; a returned fd is closed.
    let fd = unsafe { libc::open(c(path).as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    if fd >= 0 {
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        return Err(format!("opened {path}"));
    }
    let e = errno();
    if ok.contains(&e) {
        Ok(format!("{path}: {}", errname(e)))
    } else {
        Err(format!("{path}: unexpected {}", errname(e)))
    }
}

fn host_processes() -> Attempt {
    let me = std::process::id();
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // Only our init (1) and ourselves.
    if pids.iter().all(|&p| p == 1 || p == me) && pids.len() <= 2 {
        Ok(format!("only pids {pids:?} visible"))
    } else {
        Err(format!("visible pids {pids:?}"))
    }
}

fn read_host_files() -> Attempt {
    let mut out = Vec::new();
    for p in [
        "/etc/shadow",
        "/etc/passwd",
        "/root",
        "/home",
        "/var/lib",
        "/run",
        "/sys/kernel",
        "/boot",
    ] {
        match std::fs::metadata(p) {
            Ok(_) => return Err(format!("{p} exists inside the sandbox")),
            Err(e) => out.push(format!("{p}: {e}")),
        }
    }
    Ok(out.join("; "))
}

fn write_outside_tmp() -> Attempt {
    let mut out = Vec::new();
    for p in [
        "/x",
        "/var/task/x",
        "/usr/x",
        "/etc/x",
        "/dev/x",
        "/proc/x",
        "/var/x",
        "/lib/x",
    ] {
        out.push(open_fails(
            p,
            libc::O_CREAT | libc::O_WRONLY,
            &[libc::EROFS, libc::EACCES, libc::EPERM, libc::ENOENT],
        )?);
    }
    // And writes into existing files of the host runtime.
    out.push(open_fails(
        "/etc/hosts",
        libc::O_WRONLY,
        &[libc::EROFS, libc::EACCES, libc::ENOENT],
    )?);
    out.push(open_fails(
        "/usr/bin/env",
        libc::O_WRONLY,
        &[libc::EROFS, libc::EACCES, libc::ETXTBSY],
    )?);
    Ok(out.join("; "))
}

fn write_proc_sys() -> Attempt {
    let mut out = Vec::new();
    for p in [
        "/proc/sys/kernel/core_pattern",
        "/proc/sysrq-trigger",
        "/proc/sys/kernel/hostname",
        "/proc/sys/vm/drop_caches",
    ] {
        out.push(open_fails(
            p,
            libc::O_WRONLY,
            &[libc::EROFS, libc::EACCES, libc::EPERM, libc::ENOENT],
        )?);
    }
    Ok(out.join("; "))
}

fn masked_proc() -> Attempt {
    for p in [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
    ] {
        if let Ok(s) = std::fs::read(p)
            .map(|s| s.len())
            .map_err(drop)
            .and_then(|n| if n > 0 { Ok(n) } else { Err(()) })
        {
            return Err(format!("{p} readable ({s} bytes)"));
        }
    }
    Ok("kcore, keys, timer_list, sched_debug read as empty or not at all".into())
}

fn mount_attempts() -> Attempt {
    // SAFETY: constant strings.
    let r = unsafe {
        libc::mount(
            c("tmpfs").as_ptr(),
            c("/tmp").as_ptr(),
            c("tmpfs").as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    let a = must_fail(r as libc::c_long, &[libc::EPERM])?;
    // SAFETY: constant strings.
    let r = unsafe { libc::umount2(c("/proc").as_ptr(), libc::MNT_DETACH) };
    let b = must_fail(r as libc::c_long, &[libc::EPERM])?;
    // The new mount API (fsopen) and the cgroup release_agent trick (CVE-2022-0492) both need it.
    // SAFETY: fsopen with a constant name.
    let r = unsafe { libc::syscall(libc::SYS_fsopen, c("cgroup").as_ptr(), 0) };
    let d = must_fail(r, &[libc::EPERM])?;
    // SAFETY: constant paths.
    let r = unsafe { libc::chroot(c("/tmp").as_ptr()) };
    let e = must_fail(r as libc::c_long, &[libc::EPERM])?;
    // SAFETY: constant paths.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, c("/tmp").as_ptr(), c("/tmp").as_ptr()) };
    let f = must_fail(r, &[libc::EPERM])?;
    Ok(format!(
        "mount {a}; umount {b}; fsopen {d}; chroot {e}; pivot_root {f}"
    ))
}

fn unshare_attempts() -> Attempt {
    let mut out = Vec::new();
    for (name, flag) in [
        ("user", libc::CLONE_NEWUSER),
        ("mnt", libc::CLONE_NEWNS),
        ("net", libc::CLONE_NEWNET),
        ("pid", libc::CLONE_NEWPID),
        ("cgroup", libc::CLONE_NEWCGROUP),
    ] {
        // SAFETY: unshare with one flag; on success we only report it.
        let r = unsafe { libc::unshare(flag) };
        out.push(format!(
            "{name}: {}",
            must_fail(r as libc::c_long, &[libc::EPERM])?
        ));
    }
    // clone(2) with a namespace flag, the way a runtime would try it.
    // SAFETY: a fork-like clone; the child exits at once.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if r == 0 {
        // SAFETY: we are the child.
        unsafe { libc::_exit(0) };
    }
    out.push(format!("clone(NEWUSER): {}", must_fail(r, &[libc::EPERM])?));
    // clone3 hides its flags from seccomp: it must be refused outright.
    // SAFETY: clone3 with a zeroed args struct would be a fork; it must fail before that.
    let args = [0u64; 11];
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args.as_ptr(),
            std::mem::size_of_val(&args),
        )
    };
    if r == 0 {
        // SAFETY: we are the child.
        unsafe { libc::_exit(0) };
    }
    out.push(format!(
        "clone3: {}",
        must_fail(r, &[libc::ENOSYS, libc::EPERM])?
    ));
    Ok(out.join("; "))
}

fn setns_attempt() -> Attempt {
    // SAFETY: open a namespace file; the fd is closed.
    let fd = unsafe {
        libc::open(
            c("/proc/1/ns/net").as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Ok(format!(
            "cannot even open /proc/1/ns/net: {}",
            errname(errno())
        ));
    }
    // SAFETY: fd is ours.
    let r = unsafe { libc::setns(fd, 0) };
    let res = must_fail(r as libc::c_long, &[libc::EPERM]);
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    res
}

fn ptrace_attempts() -> Attempt {
    // SAFETY: ptrace attach to our init (pid 1).
    let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) };
    let a = must_fail(r, &[libc::EPERM])?;
    // SAFETY: PTRACE_TRACEME takes no pointers.
    let r = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
    let b = must_fail(r, &[libc::EPERM])?;
    let mut buf = [0u8; 8];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: 0x400000 as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: the local iovec points at our buffer.
    let r = unsafe { libc::process_vm_readv(1, &local, 1, &remote, 1, 0) };
    let d = must_fail(r as libc::c_long, &[libc::EPERM])?;
    // SAFETY: pidfd_open on pid 1 then pidfd_getfd: both integer arguments.
    let pfd = unsafe { libc::syscall(libc::SYS_pidfd_open, 1, 0) };
    let e = if pfd >= 0 {
        // SAFETY: integer arguments.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pfd, 3, 0) };
        // SAFETY: pfd is ours.
        unsafe { libc::close(pfd as i32) };
        must_fail(r, &[libc::EPERM, libc::EBADF])?
    } else {
        format!("pidfd_open: {}", errname(errno()))
    };
    Ok(format!(
        "attach init {a}; traceme {b}; process_vm_readv {d}; pidfd_getfd {e}"
    ))
}

fn init_is_sealed() -> Attempt {
    // CVE-2019-5736: a function that can open the runtime's binary through /proc/<init>/exe can
    // overwrite it on the host.
    let mut out = Vec::new();
    for p in [
        "/proc/1/exe",
        "/proc/1/root/.",
        "/proc/1/cwd/.",
        "/proc/1/mem",
        "/proc/1/environ",
    ] {
        out.push(open_fails(p, libc::O_RDONLY, &[libc::EACCES, libc::EPERM])?);
    }
    match std::fs::read_dir("/proc/1/fd") {
        Ok(it) => {
            let n = it.count();
            if n > 0 {
                return Err(format!("/proc/1/fd lists {n} fds"));
            }
        }
        Err(e) => out.push(format!("/proc/1/fd: {e}")),
    }
    // Our own exe is a read-only bind: cannot be written either.
    out.push(open_fails(
        "/proc/self/exe",
        libc::O_WRONLY,
        &[libc::EROFS, libc::ETXTBSY, libc::EACCES],
    )?);
    Ok(out.join("; "))
}

fn leaked_fds() -> Attempt {
    // CVE-2024-21626: an fd of the runtime's that survives exec opens the host file system.
    let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok())
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            format!("{}->{}", e.file_name().to_string_lossy(), target)
        })
        .collect();
    // 0, 1, 2, and the directory handle read_dir itself holds.
    if fds.len() <= 4 {
        Ok(format!("fds: {}", fds.join(", ")))
    } else {
        Err(format!("extra fds: {}", fds.join(", ")))
    }
}

fn kernel_attempts() -> Attempt {
    let mut out = Vec::new();
    let img = [0u8; 16];
    // SAFETY: init_module reads len bytes of img.
    let r = unsafe {
        libc::syscall(
            libc::SYS_init_module,
            img.as_ptr(),
            img.len(),
            c("").as_ptr(),
        )
    };
    out.push(format!("init_module {}", must_fail(r, &[libc::EPERM])?));
    // SAFETY: integer arguments and a constant string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, 0, c("").as_ptr(), 0) };
    out.push(format!("finit_module {}", must_fail(r, &[libc::EPERM])?));
    // SAFETY: delete_module with a constant name.
    let r = unsafe { libc::syscall(libc::SYS_delete_module, c("ext4").as_ptr(), 0) };
    out.push(format!("delete_module {}", must_fail(r, &[libc::EPERM])?));
    let attr = [0u8; 128];
    // SAFETY: bpf reads up to size bytes of attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            5, /* BPF_PROG_LOAD */
            attr.as_ptr(),
            attr.len(),
        )
    };
    out.push(format!("bpf {}", must_fail(r, &[libc::EPERM])?));
    let pattr = [0u8; 128];
    // SAFETY: perf_event_open reads the attr buffer.
    let r = unsafe { libc::syscall(libc::SYS_perf_event_open, pattr.as_ptr(), 0, -1, -1, 0) };
    out.push(format!("perf_event_open {}", must_fail(r, &[libc::EPERM])?));
    // SAFETY: keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL).
    let r = unsafe { libc::syscall(libc::SYS_keyctl, 1, 0usize) };
    out.push(format!("keyctl {}", must_fail(r, &[libc::EPERM])?));
    // SAFETY: add_key with constant strings and an empty payload.
    let r = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            c("user").as_ptr(),
            c("x").as_ptr(),
            std::ptr::null::<u8>(),
            0,
            -3,
        )
    };
    out.push(format!("add_key {}", must_fail(r, &[libc::EPERM])?));
    let params = [0u8; 120];
    // SAFETY: io_uring_setup reads the params buffer.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 8, params.as_ptr()) };
    out.push(format!("io_uring_setup {}", must_fail(r, &[libc::EPERM])?));
    // SAFETY: userfaultfd with flags 0.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, 0) };
    out.push(format!("userfaultfd {}", must_fail(r, &[libc::EPERM])?));
    let handle = [0u8; 64];
    // SAFETY: open_by_handle_at reads the handle buffer (CVE-2014-3519 "shocker").
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            libc::AT_FDCWD,
            handle.as_ptr(),
            0,
        )
    };
    out.push(format!(
        "open_by_handle_at {}",
        must_fail(r, &[libc::EPERM])?
    ));
    // SAFETY: kexec_load with no segments.
    let r = unsafe { libc::syscall(libc::SYS_kexec_load, 0, 0, 0, 0) };
    out.push(format!("kexec_load {}", must_fail(r, &[libc::EPERM])?));
    // SAFETY: reboot with a wrong magic only returns an error.
    let r = unsafe { libc::syscall(libc::SYS_reboot, 0xfee1dead_u32, 672274793, 0x4321fedc, 0) };
    out.push(format!("reboot {}", must_fail(r, &[libc::EPERM])?));
    // SAFETY: personality with READ_IMPLIES_EXEC.
    let r = unsafe { libc::personality(0x0400000) };
    out.push(format!(
        "personality {}",
        must_fail(r as libc::c_long, &[libc::EPERM])?
    ));
    // SAFETY: swapon with a constant path.
    let r = unsafe { libc::syscall(libc::SYS_swapon, c("/tmp/swap").as_ptr(), 0) };
    out.push(format!("swapon {}", must_fail(r, &[libc::EPERM])?));
    // SAFETY: mknod in /tmp (nodev anyway).
    let r = unsafe {
        libc::mknod(
            c("/tmp/null").as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 3),
        )
    };
    out.push(format!(
        "mknod {}",
        must_fail(r as libc::c_long, &[libc::EPERM])?
    ));
    Ok(out.join("; "))
}

fn tiocsti() -> Attempt {
    let ch = b'x';
    // SAFETY: TIOCSTI reads one byte from ch.
    let r = unsafe { libc::ioctl(0, libc::TIOCSTI, &ch) };
    must_fail(r as libc::c_long, &[libc::EPERM])
}

fn i386_syscall() -> Attempt {
    let ret: i32;
    // SAFETY: int 0x80 with eax = 20 (getpid in the i386 table); clobbers only eax.
    unsafe { std::arch::asm!("int 0x80", inlateout("eax") 20i32 => ret, options(nostack)) };
    if ret == -libc::EPERM {
        Ok("int 0x80 getpid: EPERM".into())
    } else {
        Err(format!("int 0x80 getpid returned {ret}"))
    }
}

fn x32_syscall() -> Attempt {
    // SAFETY: getpid with the x32 bit set; takes no arguments.
    let r = unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) };
    // EPERM proves the filter saw it (a kernel without x32 alone would say ENOSYS).
    must_fail(r, &[libc::EPERM])
}

fn raw_sockets() -> Attempt {
    let mut out = Vec::new();
    for (name, dom, ty, proto) in [
        (
            "AF_INET/SOCK_RAW",
            libc::AF_INET,
            libc::SOCK_RAW,
            libc::IPPROTO_ICMP,
        ),
        (
            "AF_INET6/SOCK_RAW",
            libc::AF_INET6,
            libc::SOCK_RAW,
            libc::IPPROTO_ICMPV6,
        ),
        ("AF_PACKET", libc::AF_PACKET, libc::SOCK_RAW, 0x0300),
        ("AF_PACKET/DGRAM", libc::AF_PACKET, libc::SOCK_DGRAM, 0x0300),
    ] {
        // SAFETY: socket with integer arguments; a returned fd is reported, never used.
        let r = unsafe { libc::socket(dom, ty | libc::SOCK_CLOEXEC, proto) };
        out.push(format!(
            "{name}: {}",
            must_fail(r as libc::c_long, &[libc::EPERM, libc::EACCES])?
        ));
    }
    Ok(out.join("; "))
}

/// Set (by the test's manifest) when the function has egress: then `eth0` is expected too.
fn has_egress() -> bool {
    std::env::var_os("PROBE_EGRESS").is_some()
}

/// The default route's gateway (the host's bridge address), from /proc/net/route.
fn gateway() -> Option<std::net::Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[1] == "00000000")
            .then(|| u32::from_str_radix(f[2], 16).ok())
            .flatten()
            .map(|g| std::net::Ipv4Addr::from(g.swap_bytes()))
    })
}

fn interfaces() -> Attempt {
    let text = std::fs::read_to_string("/proc/net/dev").map_err(|e| e.to_string())?;
    let mut names: Vec<&str> = text
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    names.sort();
    let expected: &[&str] = if has_egress() {
        &["eth0", "lo"]
    } else {
        &["lo"]
    };
    if names != expected {
        return Err(format!("interfaces {names:?}"));
    }
    // IPv6 is off on eth0: no address of any scope.
    let v6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    if v6.lines().any(|l| l.trim_end().ends_with("eth0")) {
        return Err(format!("IPv6 on eth0: {v6}"));
    }
    // lo must be up: a loopback connection inside works.
    let l =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("lo not usable: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    std::net::TcpStream::connect(addr).map_err(|e| format!("lo not up: {e}"))?;
    Ok("only lo, and it is up".into())
}

fn host_network(port: u16) -> Attempt {
    // The test listens on the host (on every address): a different network namespace must
    // reach it neither on 127.0.0.1 nor, with egress, on the host's bridge address.
    let mut targets = vec![std::net::Ipv4Addr::LOCALHOST];
    if has_egress() {
        targets.push(gateway().ok_or("egress but no default route")?);
    }
    let mut out = Vec::new();
    for ip in targets {
        match std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_millis(500)) {
            Ok(_) => return Err(format!("connected to the host at {ip}:{port}")),
            Err(e) => out.push(format!("{ip}:{port}: {e}")),
        }
    }
    Ok(out.join("; "))
}

fn become_root() -> Attempt {
    // EPERM for want of CAP_SETUID; EINVAL in a user namespace where 0 is not mapped at all.
    let refused = [libc::EPERM, libc::EINVAL];
    // SAFETY: setuid/setgid with integer arguments.
    let a = must_fail(unsafe { libc::setuid(0) } as libc::c_long, &refused)?;
    // SAFETY: as above.
    let b = must_fail(unsafe { libc::setgid(0) } as libc::c_long, &refused)?;
    let groups = [0 as libc::gid_t];
    // SAFETY: setgroups reads one gid.
    let d = must_fail(
        unsafe { libc::setgroups(1, groups.as_ptr()) } as libc::c_long,
        &refused,
    )?;
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let line = status
            .lines()
            .find(|l| l.starts_with(key))
            .ok_or(format!("{key} missing"))?;
        if !line.ends_with("0000000000000000") {
            return Err(format!("capabilities left: {line}"));
        }
    }
    for (key, want) in [("NoNewPrivs", "1"), ("Seccomp", "2")] {
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{key}:")))
            .ok_or(format!("{key} missing"))?;
        if line.split_whitespace().nth(1) != Some(want) {
            return Err(line.to_string());
        }
    }
    // SAFETY: getuid/getgid take nothing.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if uid == 0 || gid == 0 {
        return Err(format!("running as {uid}:{gid}"));
    }
    Ok(format!(
        "uid {uid} gid {gid}; setuid {a}; setgid {b}; setgroups {d}; all five cap sets empty; no_new_privs; seccomp filter"
    ))
}

fn change_hostname() -> Attempt {
    // SAFETY: sethostname reads 4 bytes.
    let r = unsafe { libc::sethostname(c("evil").as_ptr(), 4) };
    must_fail(r as libc::c_long, &[libc::EPERM])
}

fn signal_agent(host_pid: i32) -> Attempt {
    // The agent's pid from the host is meaningless here: either no such process or not ours.
    // SAFETY: kill with integer arguments (signal 0 only probes).
    let r = unsafe { libc::kill(host_pid, 0) };
    let a = must_fail(r as libc::c_long, &[libc::ESRCH, libc::EPERM])?;
    // SIGKILL to our own init is ignored by the kernel from inside the namespace.
    // SAFETY: as above.
    unsafe { libc::kill(1, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: as above.
    if unsafe { libc::kill(1, 0) } != 0 {
        return Err("init is gone after SIGKILL from inside".into());
    }
    Ok(format!(
        "kill(host pid {host_pid}): {a}; SIGKILL to init ignored"
    ))
}

fn dev_nodes() -> Attempt {
    let mut names: Vec<String> = std::fs::read_dir("/dev")
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_symlink()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if names != ["full", "null", "random", "urandom", "zero"] {
        return Err(format!("/dev holds {names:?}"));
    }
    std::fs::write("/dev/null", b"x").map_err(|e| format!("/dev/null not writable: {e}"))?;
    Ok("/dev has only full, null, random, urandom, zero".into())
}

fn tmp_noexec() -> Attempt {
    std::fs::copy("/proc/self/exe", "/tmp/probe-copy")
        .map_err(|e| format!("copy to /tmp failed: {e}"))?;
    let r = std::process::Command::new("/tmp/probe-copy")
        .arg("noop")
        .status();
    let _ = std::fs::remove_file("/tmp/probe-copy");
    match r {
        Ok(s) => Err(format!("executed a binary from /tmp ({s})")),
        Err(e) => Ok(format!("exec from /tmp: {e}")),
    }
}

fn escape(host_pid: i32, host_port: u16) {
    let attempts: Vec<Door> = vec![
        ("see host processes", Box::new(host_processes)),
        ("read host files", Box::new(read_host_files)),
        ("write outside /tmp", Box::new(write_outside_tmp)),
        ("write /proc/sys and sysrq", Box::new(write_proc_sys)),
        ("read masked /proc files", Box::new(masked_proc)),
        ("mount, chroot, pivot_root", Box::new(mount_attempts)),
        ("unshare and clone namespaces", Box::new(unshare_attempts)),
        ("setns into init's namespace", Box::new(setns_attempt)),
        ("ptrace and process_vm", Box::new(ptrace_attempts)),
        (
            "reach the runtime through /proc/1 (CVE-2019-5736)",
            Box::new(init_is_sealed),
        ),
        ("leaked fds (CVE-2024-21626)", Box::new(leaked_fds)),
        (
            "kernel: modules, bpf, perf, keyring, io_uring, kexec",
            Box::new(kernel_attempts),
        ),
        ("TIOCSTI", Box::new(tiocsti)),
        ("i386 syscall", Box::new(i386_syscall)),
        ("x32 syscall", Box::new(x32_syscall)),
        ("raw and packet sockets", Box::new(raw_sockets)),
        ("network interfaces", Box::new(interfaces)),
        (
            "reach the host network",
            Box::new(move || host_network(host_port)),
        ),
        ("become uid 0", Box::new(become_root)),
        ("change hostname", Box::new(change_hostname)),
        ("signal the agent", Box::new(move || signal_agent(host_pid))),
        ("device nodes", Box::new(dev_nodes)),
        ("exec from /tmp", Box::new(tmp_noexec)),
    ];
    let mut stdout = std::io::stdout().lock();
    for (name, f) in attempts {
        let line = match f() {
            Ok(how) => format!("ATTEMPT {name}: BLOCKED: {how}"),
            Err(what) => format!("ATTEMPT {name}: OPEN: {what}"),
        };
        let _ = writeln!(stdout, "{line}");
    }
}

fn spin(secs: f64) {
    let start = Instant::now();
    let mut x: u64 = 0;
    while start.elapsed().as_secs_f64() < secs {
        for i in 0..10_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
    }
    println!("spun {secs}s ({x})");
}

fn alloc(mib: usize) {
    // A non-zero fill writes every page, so all of it is charged to the cgroup.
    let v = vec![1u8; mib << 20];
    println!(
        "allocated {mib} MiB ({})",
        v.iter().step_by(4096).map(|&b| b as u64).sum::<u64>()
    );
}

fn forkbomb() {
    let mut n = 0;
    loop {
        // SAFETY: fork in a single-threaded probe; children only sleep and exit.
        match unsafe { libc::fork() } {
            0 => {
                std::thread::sleep(Duration::from_secs(30));
                // SAFETY: child exits.
                unsafe { libc::_exit(0) };
            }
            -1 => {
                println!("fork failed after {n} children: {}", errname(errno()));
                return;
            }
            _ => n += 1,
        }
        if n > 100_000 {
            println!("fork bomb was not contained: {n} children");
            return;
        }
    }
}

fn filltmp() {
    let mut f = match std::fs::File::create("/tmp/fill") {
        Ok(f) => f,
        Err(e) => {
            println!("create failed: {e}");
            return;
        }
    };
    let chunk = vec![7u8; 1 << 20];
    let mut written: u64 = 0;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) => {
                println!("wrote {written} bytes then: {e}");
                return;
            }
        }
    }
    println!("wrote {written} bytes without error");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(1) {
        "escape" => escape(arg(2).parse().unwrap_or(1), arg(3).parse().unwrap_or(1)),
        "spin" => spin(arg(2).parse().unwrap_or(1.0)),
        "alloc" => alloc(arg(2).parse().unwrap_or(16)),
        "forkbomb" => forkbomb(),
        "filltmp" => filltmp(),
        "noop" => {}
        other => {
            eprintln!(
                "fnlet-probe: unknown command {other:?} (escape|spin|alloc|forkbomb|filltmp)"
            );
            std::process::exit(2);
        }
    }
}
