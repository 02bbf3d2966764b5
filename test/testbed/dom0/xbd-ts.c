/*
 * xbd-ts: copy stdin to stdout, each line prefixed with the time its first
 * byte was read (CLOCK_REALTIME, seconds.microseconds, then a space).
 *
 * xl -T stamps its log lines with whole seconds only; the suite pipes
 * `xl -vvv -T create` through this to time the hotplug scripts in
 * milliseconds (create() and timing_table in suite.sh). xl writes its log to
 * an unbuffered stderr, so a line is read as soon as xl writes it. Static C
 * (built by e2e.sh on the host): the dom0 image has no perl Time::HiRes, no
 * python and no moreutils `ts`, and changing the image means a rebuild.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int main(void)
{
	static char in[65536];
	int at_line_start = 1;
	for (;;) {
		ssize_t n = read(0, in, sizeof(in));
		if (n <= 0)
			break;
		struct timespec now;
		clock_gettime(CLOCK_REALTIME, &now);
		for (ssize_t i = 0; i < n; i++) {
			if (at_line_start)
				printf("%lld.%06ld ", (long long)now.tv_sec, now.tv_nsec / 1000);
			putchar(in[i]);
			at_line_start = in[i] == '\n';
		}
		fflush(stdout);
	}
	return 0;
}
