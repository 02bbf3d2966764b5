/* Kept under testdata/ because the go tool refuses C files in a non-cgo package. */
/* LD_PRELOAD shim: run Debian's xenstored/oxenstored (Xen 4.17 and 4.20) without a hypervisor.
 * Build: gcc -O2 -Wall -shared -fPIC -o libxsfake.so xsfake.c -ldl
 * Env: XSFAKE_PORT=<file containing "1" (no newline)>  XSFAKE_KVA=<4096-byte zero file> */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

struct fake_evtchn { int fd; };
static int next_port = 10;

/* libxenctrl */
void *xc_interface_open(void *l, void *dl, unsigned f) { (void)l; (void)dl; (void)f; return calloc(1, 64); }
int xc_interface_close(void *x) { free(x); return 0; }
/* cxenstored asks whether a domain exists (e.g. when set-perms names a domid):
 * every domain exists and runs. Only the leading fields of xc_dominfo_t
 * (xenctrl.h 4.17; Xen 4.17 and older) are written; the caller's struct is larger. */
struct fake_dominfo_head { uint32_t domid, ssidref; unsigned int flags, shutdown_reason; };
int xc_domain_getinfo(void *x, uint32_t first, unsigned int max, void *info)
{
	struct fake_dominfo_head *h = info;
	(void)x;
	if (max == 0) return 0;
	memset(h, 0, sizeof(*h));
	h->domid = first;
	return 1;
}
/* Xen 4.18 replaced xc_domain_getinfo with these (xc_domaininfo_t is the
 * hypercall's struct xen_domctl_getdomaininfo): 4.20's cxenstored asks for one
 * domain, oxenstored's domain_getinfo_v1 plugin for one or for all. Only the
 * leading fields (domain, pad, flags) are written; the caller's struct is
 * larger. flags 0: running, neither dying nor shut down. */
struct fake_domaininfo_head { uint16_t domain, pad1; uint32_t flags; };
int xc_domain_getinfo_single(void *x, uint32_t domid, void *info)
{
	struct fake_domaininfo_head *h = info;
	(void)x;
	memset(h, 0, sizeof(*h));
	h->domain = (uint16_t)domid;
	return 0;
}
/* The plugin fails on 0 domains; dom0 is the only one. It asks only when
 * VIRQ_DOM_EXC fires, which never happens here. */
int xc_domain_getinfolist(void *x, uint32_t first, unsigned int max, void *info)
{
	(void)x;
	if (max == 0 || first > 0) return 0;
	return xc_domain_getinfo_single(x, 0, info) == 0 ? 1 : -1;
}
/* xc_error: { int code; char message[1024]; }, code 0 is XC_ERROR_NONE */
struct fake_xc_error { int code; char message[1024]; };
const void *xc_get_last_error(void *x) { static struct fake_xc_error none; (void)x; return &none; }
const char *xc_error_code_to_desc(int code) { (void)code; return "no error (xsfake)"; }
/* libxengnttab */
void *xengnttab_open(void *l, unsigned f) { (void)l; (void)f; return calloc(1, 64); }
int xengnttab_close(void *h) { free(h); return 0; }
int xengnttab_set_max_grants(void *h, uint32_t n) { (void)h; (void)n; return 0; }
/* libxenevtchn: the fd is an eventfd that is never signalled */
void *xenevtchn_open(void *l, unsigned flags)
{
	struct fake_evtchn *e = calloc(1, sizeof(*e));
	(void)l;
	if (!e) return NULL;
	e->fd = eventfd(0, (flags & 1 /* XENEVTCHN_NO_CLOEXEC */) ? 0 : EFD_CLOEXEC);
	return e;
}
void *xenevtchn_fdopen(void *l, int fd, unsigned f)
{
	struct fake_evtchn *e = calloc(1, sizeof(*e));
	(void)l; (void)f;
	if (!e) return NULL;
	e->fd = fd;
	return e;
}
int xenevtchn_close(void *h) { struct fake_evtchn *e = h; if (e) { close(e->fd); free(e); } return 0; }
int xenevtchn_fd(void *h) { return ((struct fake_evtchn *)h)->fd; }
int xenevtchn_notify(void *h, uint32_t p) { (void)h; (void)p; return 0; }
int xenevtchn_bind_unbound_port(void *h, uint32_t d) { (void)h; (void)d; return next_port++; }
int xenevtchn_bind_interdomain(void *h, uint32_t d, uint32_t p) { (void)h; (void)d; (void)p; return next_port++; }
int xenevtchn_bind_virq(void *h, unsigned v) { (void)h; (void)v; return next_port++; }
int xenevtchn_unbind(void *h, uint32_t p) { (void)h; (void)p; return 0; }
int xenevtchn_pending(void *h) { (void)h; errno = EAGAIN; return -1; }
int xenevtchn_unmask(void *h, uint32_t p) { (void)h; (void)p; return 0; }

/* cxenstored dom0_init(): xenbus_evtchn()/xenbus_map() open these with plain open() */
static const char *redirect(const char *path)
{
	const char *r;
	if (!path) return path;
	if (!strcmp(path, "/proc/xen/xsd_port") && (r = getenv("XSFAKE_PORT"))) return r;
	if (!strcmp(path, "/proc/xen/xsd_kva") && (r = getenv("XSFAKE_KVA"))) return r;
	return path;
}
static mode_t getmode(int flags, va_list ap) { return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0; }
int open(const char *p, int flags, ...)
{
	static int (*real)(const char *, int, ...);
	va_list ap; va_start(ap, flags); mode_t m = getmode(flags, ap); va_end(ap);
	if (!real) real = dlsym(RTLD_NEXT, "open");
	return real(redirect(p), flags, m);
}
int open64(const char *p, int flags, ...)
{
	static int (*real)(const char *, int, ...);
	va_list ap; va_start(ap, flags); mode_t m = getmode(flags, ap); va_end(ap);
	if (!real) real = dlsym(RTLD_NEXT, "open64");
	return real(redirect(p), flags, m);
}
int openat(int dfd, const char *p, int flags, ...)
{
	static int (*real)(int, const char *, int, ...);
	va_list ap; va_start(ap, flags); mode_t m = getmode(flags, ap); va_end(ap);
	if (!real) real = dlsym(RTLD_NEXT, "openat");
	return real(dfd, redirect(p), flags, m);
}

/* oxenstored raises RLIMIT_NOFILE to fs.nr_open; clamp to the hard limit if EPERM */
int setrlimit(__rlimit_resource_t res, const struct rlimit *rl)
{
	static int (*real)(__rlimit_resource_t, const struct rlimit *);
	struct rlimit cur, want;
	if (!real) real = dlsym(RTLD_NEXT, "setrlimit");
	if (real(res, rl) == 0) return 0;
	if (errno != EPERM || getrlimit(res, &cur)) return -1;
	want = *rl;
	if (want.rlim_max > cur.rlim_max) want.rlim_max = cur.rlim_max;
	if (want.rlim_cur > want.rlim_max) want.rlim_cur = want.rlim_max;
	return real(res, &want);
}
int setrlimit64(__rlimit_resource_t res, const struct rlimit64 *rl) { return setrlimit(res, (const struct rlimit *)rl); }
