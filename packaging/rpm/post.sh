# shellcheck shell=sh
# fnlet .rpm %post ($1: 1 on install, 2+ on upgrade). Like %systemd_post, but enabling and
# starting the agent on first install, as the .deb does: installing fnlet means running it.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -eq 1 ]; then
		systemctl enable --now fnlet.service >/dev/null 2>&1 || :
	fi
fi
