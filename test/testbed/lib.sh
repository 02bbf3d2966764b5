# lib.sh: sourced by the host-side testbed scripts (build-image.sh, run.sh, e2e.sh, demo.sh).
# Holds the cache location, the recipe hash and small helpers; nothing here runs on its own.

TESTBED_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TESTBED_CACHE=${XENBLKD_TESTBED_CACHE:-/var/cache/xenblkd-testbed}
# The Debian release of the dom0 image: releases/<name>.conf. XENBLKD_TESTBED_RELEASE picks one for
# build-image.sh and run.sh; e2e.sh runs every release in XENBLKD_TESTBED_RELEASES.
TESTBED_RELEASE=${XENBLKD_TESTBED_RELEASE:-bookworm}

# testbed_releases prints every release the testbed has a recipe for, oldest first.
testbed_releases() {
	local f
	for f in "$TESTBED_DIR"/releases/*.conf; do
		f=${f##*/}
		printf '%s %s\n' "$(. "$TESTBED_DIR/releases/$f" && echo "$ORDER")" "${f%.conf}"
	done | sort -n | cut -d' ' -f2
}

# The recipe is every file that shapes the cached image of $TESTBED_RELEASE: the shared scripts
# and image/* plus that release's conf (not the other releases'). Editing any of them changes the
# hash and so triggers a rebuild; the in-dom0 test scripts and the xenblkd binary are not part of
# it (they travel on the control disk at every run).
recipe_files() {
	printf '%s\n' "$TESTBED_DIR/build-image.sh" "$TESTBED_DIR/configure-rootfs.sh" \
		"$TESTBED_DIR"/image/* "$TESTBED_DIR/releases/$TESTBED_RELEASE.conf"
}

# recipe_hash prints a short hash of the recipe's content (file names relative, so that two
# checkouts of the same commit share one cache entry).
recipe_hash() {
	local f
	for f in $(recipe_files); do
		printf '%s\n' "${f#"$TESTBED_DIR"/}"
		cat "$f"
	done | sha256sum | cut -c1-16
}

# image_dir prints the cache directory of the current release's recipe (it may not exist yet).
image_dir() { printf '%s/%s-%s\n' "$TESTBED_CACHE" "$TESTBED_RELEASE" "$(recipe_hash)"; }

# check_release dies unless $TESTBED_RELEASE has a recipe.
check_release() {
	[[ -f $TESTBED_DIR/releases/$TESTBED_RELEASE.conf ]] ||
		die "no release $TESTBED_RELEASE (test/testbed/releases/: $(testbed_releases | tr '\n' ' '))"
}

# log MSG: a timestamped line on stderr, naming the release when one was picked (e2e.sh boots
# the releases side by side, and their lines interleave).
log() { printf '[testbed %s%s] %s\n' "$(date +%T)" "${XENBLKD_TESTBED_RELEASE:+ $XENBLKD_TESTBED_RELEASE}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# seconds_since T0: elapsed seconds (one decimal) since an $EPOCHREALTIME value.
seconds_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b - a}'; }

# debian_mirror prints the Debian mirror from the host's apt configuration (never hard-coded).
debian_mirror() {
	local m=""
	if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
		m=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
	fi
	if [[ -z $m && -f /etc/apt/sources.list ]]; then
		m=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
	fi
	printf '%s\n' "$m"
}
