# shellcheck shell=sh
# fnlet .rpm %preun ($1: 0 on erase, 1+ on upgrade): stop and disable the agent on erase
# (it drains in-flight invocations and removes every sandbox cgroup).
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
	systemctl disable --now fnlet.service >/dev/null 2>&1 || :
fi
