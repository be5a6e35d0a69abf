//! The rules of the seccomp filter every function runs under, compiled by libseccomp when
//! isolate is built (build.rs): the finished BPF program is part of the binary, so neither
//! the agent nor `fnlet sandbox run` loads libseccomp or compiles the filter at run time.
//!
//! libseccomp rather than seccompiler: it refuses the i386 and x32 ABIs with a chosen errno
//! (seccompiler kills on a foreign arch and does not look at the x32 bit at all), and it is what
//! runc, crun and systemd use. The syscall numbers and flags are the build host's (libc's):
//! build.rs refuses to build for another architecture.

use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};

/// Syscalls a function has no business with: refused with EPERM whatever the arguments.
const DENIED: &[libc::c_long] = &[
    // mounts and root changes
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    // namespaces
    libc::SYS_unshare,
    libc::SYS_setns,
    // other processes' memory
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    // the kernel itself
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_syslog,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_modify_ldt,
    libc::SYS_lookup_dcookie,
    libc::SYS_vhangup,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    // the kernel keyring
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    // sources of kernel exploits with no use in a function
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_fanotify_init,
];

/// Namespace flags that clone(2) may not carry (CLONE_NEWTIME shares its bit with CSIGNAL there).
const CLONE_NS_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

const AF_PACKET: u64 = libc::AF_PACKET as u64;
const SOCK_TYPE_MASK: u64 = 0xf;

fn err(e: impl std::fmt::Debug) -> String {
    format!("{e:?}")
}

fn eperm() -> ScmpAction {
    ScmpAction::Errno(libc::EPERM)
}

/// Builds the filter context. Default allow: a deny list keeps every runtime (glibc, CPython,
/// node, Go) working, and the dangerous surface is what the list names.
pub fn filter() -> Result<ScmpFilterContext, String> {
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(err)?;
    // Native x86-64 only: i386 (int 0x80) and x32 syscalls get EPERM instead of running.
    ctx.set_act_badarch(eperm())
        .map_err(|e| err(format!("badarch: {e:?}")))?;
    // We set no_new_privs ourselves, at a step we choose.
    ctx.set_ctl_nnp(false)
        .map_err(|e| err(format!("nnp: {e:?}")))?;
    // A binary tree on the syscall number instead of a chain of ifs: every syscall the rules
    // name is found in O(log n) instructions. The kernel runs the filter once per syscall
    // number when it is loaded (to cache the always-allowed ones), so this is also the load.
    ctx.set_ctl_optimize(2)
        .map_err(|e| err(format!("optimize: {e:?}")))?;
    for &nr in DENIED {
        ctx.add_rule(eperm(), ScmpSyscall::from(nr as i32))
            .map_err(|e| err(format!("syscall {nr}: {e:?}")))?;
    }
    // clone3 passes its flags in memory a filter cannot read: ENOSYS makes libcs fall back to
    // clone(2), whose flags we can check.
    ctx.add_rule(
        ScmpAction::Errno(libc::ENOSYS),
        ScmpSyscall::from(libc::SYS_clone3 as i32),
    )
    .map_err(err)?;
    for &flag in CLONE_NS_FLAGS {
        ctx.add_rule_conditional(
            eperm(),
            ScmpSyscall::from(libc::SYS_clone as i32),
            &[ScmpArgCompare::new(
                0,
                ScmpCompareOp::MaskedEqual(flag),
                flag,
            )],
        )
        .map_err(err)?;
    }
    // Faking terminal input into a shared tty (TIOCSTI) and console hijacks (TIOCLINUX).
    for req in [libc::TIOCSTI, libc::TIOCLINUX] {
        ctx.add_rule_conditional(
            eperm(),
            ScmpSyscall::from(libc::SYS_ioctl as i32),
            &[ScmpArgCompare::new(
                1,
                ScmpCompareOp::MaskedEqual(0xffff_ffff),
                req,
            )],
        )
        .map_err(err)?;
    }
    // Raw and packet sockets (also refused for lack of CAP_NET_RAW; refuse them twice).
    ctx.add_rule_conditional(
        eperm(),
        ScmpSyscall::from(libc::SYS_socket as i32),
        &[ScmpArgCompare::new(0, ScmpCompareOp::Equal, AF_PACKET)],
    )
    .map_err(err)?;
    ctx.add_rule_conditional(
        eperm(),
        ScmpSyscall::from(libc::SYS_socket as i32),
        &[ScmpArgCompare::new(
            1,
            ScmpCompareOp::MaskedEqual(SOCK_TYPE_MASK),
            libc::SOCK_RAW as u64,
        )],
    )
    .map_err(err)?;
    // personality(2): only the query (0xffffffff) is allowed. Other personalities change how
    // the kernel lays out memory (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE). libseccomp takes one
    // comparison per argument, so PER_LINUX (0) is refused too; no runtime we know sets it.
    ctx.add_rule_conditional(
        eperm(),
        ScmpSyscall::from(libc::SYS_personality as i32),
        &[ScmpArgCompare::new(0, ScmpCompareOp::Less, 0xffff_ffff)],
    )
    .map_err(|e| err(format!("personality: {e:?}")))?;
    Ok(ctx)
}

/// A second filter, stacked on [`filter`] for sandboxes whose loopback service is reached over
/// a Unix socket pair (`SandboxSpec::loopback_socketpair`): `connect` and TCP-level `setsockopt`
/// stop for the agent's verdict (`SECCOMP_RET_USER_NOTIF`), everything else is left to the
/// first filter. Foreign ABIs are allowed here because the first filter already refuses them
/// (the strictest verdict of a stack wins).
pub fn connect_filter() -> Result<ScmpFilterContext, String> {
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(err)?;
    ctx.set_act_badarch(ScmpAction::Allow)
        .map_err(|e| err(format!("badarch: {e:?}")))?;
    ctx.set_ctl_nnp(false)
        .map_err(|e| err(format!("nnp: {e:?}")))?;
    ctx.add_rule(
        ScmpAction::Notify,
        ScmpSyscall::from(libc::SYS_connect as i32),
    )
    .map_err(|e| err(format!("connect: {e:?}")))?;
    // TCP_NODELAY and friends on a socket that became a Unix one would fail (EOPNOTSUPP):
    // the agent answers them for the sockets it swapped and lets the rest through.
    ctx.add_rule_conditional(
        ScmpAction::Notify,
        ScmpSyscall::from(libc::SYS_setsockopt as i32),
        &[ScmpArgCompare::new(
            1,
            ScmpCompareOp::MaskedEqual(0xffff_ffff),
            libc::IPPROTO_TCP as u64,
        )],
    )
    .map_err(|e| err(format!("setsockopt: {e:?}")))?;
    Ok(ctx)
}
