#!/bin/sh
# deb-changelog.sh VERSION MAINTAINER: print the package's Debian changelog.
# dist/debian/changelog holds the releases; a build of any other version (a
# snapshot: VERSION+N.gHASH, see the Makefile) gets one entry on top naming
# its commit, dated by that commit so the same commit builds the same package.
set -eu
version=$1
maintainer=$2
changelog=dist/debian/changelog
top=$(sed -n '1s/^xenblkd (\([^)]*\)).*/\1/p' "$changelog")
if [ "$version" != "$top" ]; then
	commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
	date=$(git log -1 --format=%aD 2>/dev/null || date -R)
	# RFC 2822 as Debian wants it: a two-digit day.
	date=$(date -R -d "$date")
	printf 'xenblkd (%s) unstable; urgency=medium\n\n' "$version"
	printf '  * Snapshot of commit %s after release %s.\n\n' "$commit" "$top"
	printf ' -- %s  %s\n\n' "$maintainer" "$date"
fi
cat "$changelog"
