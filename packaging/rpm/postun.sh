# shellcheck shell=sh
# fnlet .rpm %postun ($1: 0 on erase, 1+ on upgrade): after an upgrade restart the agent on the
# new binary (try-restart: only if it was running). An erase keeps /var/lib/fnlet (deployed
# functions) and /var/log/fnlet, as RPM packages keep data; remove them by hand to purge.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -ge 1 ]; then
		systemctl try-restart fnlet.service >/dev/null 2>&1 || :
	fi
fi
if [ "$1" -eq 0 ]; then
	# Directories only fnlet's files were in (cargo-generate-rpm records no directories); /etc/fnlet
	# stays while it holds an edited config.toml.rpmsave.
	rmdir /usr/share/doc/fnlet /etc/fnlet 2>/dev/null || :
	# fnlet's own cgroup roots on a cgroup v1 host, if empty (never recursive).
	for d in /sys/fs/cgroup/*/fnlet; do
		if [ -d "$d" ]; then rmdir "$d" 2>/dev/null || :; fi
	done
fi
