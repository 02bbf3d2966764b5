/*
 * xenblkd-hotplug: the script libxl execs for every disk of every VM start
 * and stop (installed as /etc/xen/scripts/xenblkd). libxl waits for it to
 * exit, so its exec-to-exit time is on the path of every VM start.
 *
 * Why C: the daemon does the work; this program only forwards one request.
 * A Go binary spends ~1.3 ms per exec starting and stopping its runtime
 * (signal handlers for every signal, threads, page faults), longer than the
 * daemon takes to answer. A static C program costs the exec itself.
 *
 * One job, the success path only:
 *   argv [script, add|remove], XENBUS_PATH=backend/vbd/<domid>/<devid>,
 *   XENBUS_TYPE unset or vbd; connect to the daemon's socket
 *   ($XENBLKD_SOCKET, else /run/xenblkd/api.sock); the daemon must run as
 *   root (SO_PEERCRED); send {"op":...,"path":...}; read one reply line;
 *   exit 0 if it starts {"ok":true.
 *
 * Everything else hands over to the Go binary (execv of $XENBLKD_BIN, else
 * the path built in, with the same argv and environment), which prints the
 * error, records it in the backend's hotplug-error (it speaks XenStore) and
 * exits non-zero. It learns how far this program got from one variable:
 *   none                   nothing was sent (bad argv or environment, no
 *                          daemon listening, a daemon not running as root):
 *                          the Go entry does the whole request itself, and
 *                          waits up to 10 s for a daemon to appear.
 *   XENBLKD_ENTRY_REPLY    the daemon's reply line (without the newline),
 *                          not a success: the Go entry reports it.
 *   XENBLKD_ENTRY_ERROR    the request was sent but no reply came (timeout,
 *                          connection lost): the message to report.
 * The request is never sent twice once a reply or an error is known.
 *
 * No stdio and no malloc on the success path: they cost syscalls (fstat,
 * brk) and this path is counted (make bench: the entry's syscalls).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef XENBLKD_BIN
#define XENBLKD_BIN "/usr/sbin/xenblkd"
#endif

/* api.DefaultSocket; internal/api's TestEntryAgrees compares them. */
#define DEFAULT_SOCKET "/run/xenblkd/api.sock"

/* api.ReplyTimeout (TestEntryAgrees): below libxl's 40 s SIGKILL of the
 * script and above the daemon's own 30 s bound on a request, so the
 * daemon's error still arrives. */
#define REPLY_TIMEOUT_SEC 35
#define STR(x) #x
#define XSTR(x) STR(x)

/* A reply larger than this is not one this program can pass on in an
 * environment variable (MAX_ARG_STRLEN is 128 KiB); the daemon's replies to
 * add and remove are a few hundred bytes, an error at most ~2 KiB. */
#define MAX_REPLY (64 * 1024)

static char reply[MAX_REPLY + 1];

/* handover execs the Go entry with our argv and environment, plus name=value
 * when name is not NULL. It returns only if the exec failed. */
static int handover(char **argv, const char *name, const char *value)
{
	const char *bin = getenv("XENBLKD_BIN");
	if (bin == NULL || bin[0] == '\0')
		bin = XENBLKD_BIN;
	/* The slow path: setenv may allocate, that is fine here. */
	if (name != NULL && setenv(name, value, 1) != 0) {
		dprintf(2, "xenblkd: cannot pass the daemon's answer on to %s: %s\n", bin, strerror(errno));
		return 1;
	}
	execv(bin, argv);
	dprintf(2, "xenblkd: cannot run %s to report an error: %s (set XENBLKD_BIN, or reinstall xenblkd)\n",
		bin, strerror(errno));
	return 1;
}

/* parse_id accepts a decimal number without leading zeros, at most max,
 * ending at end ('/' or '\0'); it returns the character after it or NULL.
 * Go's hotplug.ParseBackendPath is the reference: anything this refuses,
 * the Go entry explains. */
static const char *parse_id(const char *s, char end, unsigned long long max)
{
	unsigned long long n = 0;
	const char *p = s;
	if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] != end))
		return NULL;
	for (; *p >= '0' && *p <= '9'; p++) {
		n = n * 10 + (unsigned long long)(*p - '0');
		if (n > max)
			return NULL;
	}
	return *p == end ? p + 1 : NULL;
}

/* valid_backend: backend/vbd/<domid>/<devid>, domid < DOMID_FIRST_RESERVED,
 * devid a uint32. The path then holds only characters that need no
 * escaping in JSON. */
static int valid_backend(const char *path)
{
	static const char prefix[] = "backend/vbd/";
	if (path == NULL || strncmp(path, prefix, sizeof(prefix) - 1) != 0)
		return 0;
	const char *devid = parse_id(path + sizeof(prefix) - 1, '/', 0x7fef);
	return devid != NULL && parse_id(devid, '\0', 0xffffffffULL) != NULL;
}

/* append copies s to *p, which must have room (the caller sized the buffer). */
static void append(char **p, const char *s)
{
	size_t n = strlen(s);
	memcpy(*p, s, n);
	*p += n;
}

int main(int argc, char **argv)
{
	if (argc != 2 || (strcmp(argv[1], "add") != 0 && strcmp(argv[1], "remove") != 0))
		return handover(argv, NULL, NULL); /* usage, --help, unknown action */
	const char *path = getenv("XENBUS_PATH");
	const char *type = getenv("XENBUS_TYPE");
	if (!valid_backend(path) || (type != NULL && type[0] != '\0' && strcmp(type, "vbd") != 0))
		return handover(argv, NULL, NULL);

	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	const char *socket_path = getenv("XENBLKD_SOCKET");
	if (socket_path == NULL || socket_path[0] == '\0')
		socket_path = DEFAULT_SOCKET;
	if (strlen(socket_path) >= sizeof(addr.sun_path))
		return handover(argv, NULL, NULL); /* the Go entry says why */
	memcpy(addr.sun_path, socket_path, strlen(socket_path) + 1);

	/* The request, as the Go client writes it: {"op":"add","path":"..."}. */
	char request[96]; /* the longest is 54 bytes (remove, domid 32751, devid 2^32-1) */
	char *end = request;
	append(&end, "{\"op\":\"");
	append(&end, argv[1]);
	append(&end, "\",\"path\":\"");
	append(&end, path);
	append(&end, "\"}\n");

	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return handover(argv, NULL, NULL);
	/* connect on a unix socket does not block long (a full backlog blocks
	 * until there is room; under systemd that is systemd's socket). */
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
		/* No daemon (ENOENT, ECONNREFUSED) or another failure: the Go
		 * entry retries or explains. */
		close(fd);
		return handover(argv, NULL, NULL);
	}
	/* The entry trusts only a daemon running as root: another user could
	 * have bound the socket path (e.g. a wrong XENBLKD_SOCKET) and would
	 * otherwise learn of, and answer for, every disk. */
	struct ucred cred;
	socklen_t len = sizeof(cred);
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof(cred) || cred.uid != 0) {
		close(fd);
		return handover(argv, NULL, NULL); /* the Go entry checks again and refuses */
	}
	struct timeval timeout = {.tv_sec = REPLY_TIMEOUT_SEC};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));

	size_t want = (size_t)(end - request);
	for (size_t off = 0; off < want;) {
		/* send, not write: a daemon that closed the connection must not
		 * kill us with SIGPIPE before the error is reported. */
		ssize_t n = send(fd, request + off, want - off, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			/* Not sent, or not whole: the daemon drops a partial line, so
			 * the Go entry may send it again. */
			close(fd);
			return handover(argv, NULL, NULL);
		}
		off += (size_t)n;
	}

	size_t got = 0;
	char *newline = NULL;
	while (newline == NULL) {
		if (got == MAX_REPLY)
			return handover(argv, "XENBLKD_ENTRY_ERROR",
				"the xenblkd daemon's reply is larger than 64 KiB (see its log)");
		ssize_t n = read(fd, reply + got, MAX_REPLY - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return handover(argv, "XENBLKD_ENTRY_ERROR",
				"the xenblkd daemon did not answer within " XSTR(REPLY_TIMEOUT_SEC) " s (see its log)");
		if (n < 0)
			return handover(argv, "XENBLKD_ENTRY_ERROR",
				"lost the connection to the xenblkd daemon before its answer (see its log)");
		if (n == 0)
			return handover(argv, "XENBLKD_ENTRY_ERROR",
				"the xenblkd daemon closed the connection without answering (see its log)");
		newline = memchr(reply + got, '\n', (size_t)n);
		got += (size_t)n;
	}
	*newline = '\0';
	/* The daemon writes "ok" first (the first field of api.Response). */
	static const char ok[] = "{\"ok\":true";
	if (strncmp(reply, ok, sizeof(ok) - 1) == 0 &&
	    (reply[sizeof(ok) - 1] == ',' || reply[sizeof(ok) - 1] == '}'))
		return 0; /* the fd closes with the process */
	close(fd);
	return handover(argv, "XENBLKD_ENTRY_REPLY", reply);
}
