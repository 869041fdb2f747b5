/*
 * A sidecar in C that only translates: the least a sidecar can do per call, for the benchmark's
 * ceiling rows (benchmarks/ceiling.py, docs/BENCHMARKS.md). A reference point, not a product.
 *
 * One thread, one epoll loop. It serves get_linked_pod and set_linked_pod over MessagePack-RPC on
 * a Unix socket, as floor_sidecar.py does: each request becomes the executor's command (GET of the
 * link key, EVALSHA of the daemon's set_linked_pod script on the same two keys), queued on one
 * Redis connection that is written once per loop turn; replies are matched in order and written
 * back to each client once per turn. No argument checks beyond what parsing needs, no deadlines,
 * metrics, overload or flow control, reconnects or NOSCRIPT handling. A request it cannot parse
 * closes that client's connection; a Redis error reply answers its request with INTERNAL.
 *
 *   floor_c SOCKET REDIS_SOCKET SET_LINKED_POD_SHA      prints "ready" once serving
 */
#define _GNU_SOURCE /* accept4 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define READ_SIZE (256 * 1024)
#define MAX_FDS 65536

typedef struct {
    char *data;
    size_t len, cap, start; /* bytes [start, len) are not yet parsed, or not yet written */
} Buffer;

typedef struct {
    int open;
    unsigned generation; /* a reply for an earlier connection on the same fd is dropped */
    int dirty;           /* has replies to write this turn */
    Buffer in, out;
} Client;

typedef struct {
    int fd;
    unsigned generation;
    uint32_t msgid;
} Waiter;

static Client clients[MAX_FDS];
static int dirty[MAX_FDS];
static int dirty_count;
static Waiter *waiters; /* a ring: Redis answers in the order it was asked */
static size_t waiters_cap, waiters_head, waiters_count;
static Buffer redis_in, redis_out;
static const char *sha;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void reserve(Buffer *b, size_t extra) {
    if (b->start == b->len) {
        b->start = b->len = 0;
    }
    if (b->len + extra <= b->cap) {
        return;
    }
    if (b->start > 0) { /* compact before growing */
        memmove(b->data, b->data + b->start, b->len - b->start);
        b->len -= b->start;
        b->start = 0;
        if (b->len + extra <= b->cap) {
            return;
        }
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) {
        cap *= 2;
    }
    b->data = realloc(b->data, cap);
    if (!b->data) {
        die("realloc");
    }
    b->cap = cap;
}

static void put(Buffer *b, const void *data, size_t n) {
    reserve(b, n);
    memcpy(b->data + b->len, data, n);
    b->len += n;
}

static void put_byte(Buffer *b, uint8_t c) { put(b, &c, 1); }

/* --- MessagePack in: just what a request needs ------------------------------------------------ */

enum { NEED_MORE = -1, BAD = -2 };

typedef struct {
    const uint8_t *p, *end;
} Cursor;

static int need(const Cursor *c, size_t n) { return (size_t)(c->end - c->p) >= n ? 0 : NEED_MORE; }

static uint64_t big_endian(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

static int read_int(Cursor *c, int64_t *out) {
    if (need(c, 1)) return NEED_MORE;
    uint8_t t = *c->p;
    if (t <= 0x7f) { *out = t; c->p += 1; return 0; }
    if (t >= 0xe0) { *out = (int8_t)t; c->p += 1; return 0; }
    int n, is_signed = 0;
    switch (t) {
    case 0xcc: n = 1; break;
    case 0xcd: n = 2; break;
    case 0xce: n = 4; break;
    case 0xcf: n = 8; break;
    case 0xd0: n = 1; is_signed = 1; break;
    case 0xd1: n = 2; is_signed = 1; break;
    case 0xd2: n = 4; is_signed = 1; break;
    case 0xd3: n = 8; is_signed = 1; break;
    default: return BAD;
    }
    if (need(c, 1 + n)) return NEED_MORE;
    uint64_t v = big_endian(c->p + 1, n);
    if (is_signed && n < 8 && (v >> (8 * n - 1))) {
        v |= ~(uint64_t)0 << (8 * n); /* sign-extend */
    }
    *out = (int64_t)v;
    c->p += 1 + n;
    return 0;
}

static int read_str(Cursor *c, const uint8_t **s, size_t *n) {
    if (need(c, 1)) return NEED_MORE;
    uint8_t t = *c->p;
    size_t head;
    if ((t & 0xe0) == 0xa0) { head = 1; *n = t & 0x1f; }
    else if (t == 0xd9) { head = 2; if (need(c, 2)) return NEED_MORE; *n = c->p[1]; }
    else if (t == 0xda) { head = 3; if (need(c, 3)) return NEED_MORE; *n = big_endian(c->p + 1, 2); }
    else if (t == 0xdb) { head = 5; if (need(c, 5)) return NEED_MORE; *n = big_endian(c->p + 1, 4); }
    else return BAD;
    if (need(c, head + *n)) return NEED_MORE;
    *s = c->p + head;
    c->p += head + *n;
    return 0;
}

static int read_array(Cursor *c, size_t *n) {
    if (need(c, 1)) return NEED_MORE;
    uint8_t t = *c->p;
    if ((t & 0xf0) == 0x90) { *n = t & 0x0f; c->p += 1; return 0; }
    if (t == 0xdc) { if (need(c, 3)) return NEED_MORE; *n = big_endian(c->p + 1, 2); c->p += 3; return 0; }
    return BAD;
}

/* --- RESP out ----------------------------------------------------------------------------------- */

static void put_bulk_head(Buffer *b, size_t n) {
    char head[32];
    int len = snprintf(head, sizeof head, "$%zu\r\n", n);
    put(b, head, len);
}

static void put_bulk(Buffer *b, const void *s, size_t n) {
    put_bulk_head(b, n);
    put(b, s, n);
    put(b, "\r\n", 2);
}

static void put_int_bulk(Buffer *b, int64_t v) {
    char digits[32];
    int n = snprintf(digits, sizeof digits, "%lld", (long long)v);
    put_bulk(b, digits, n);
}

/* sf:{NS:lk:UID}SERVICE (the link key), or sf:{NS:lk:UID} with an empty service (the links hash) */
static void put_key(Buffer *b, const uint8_t *ns, size_t ns_n, const uint8_t *uid, size_t uid_n,
                    const uint8_t *svc, size_t svc_n) {
    put_bulk_head(b, 4 + ns_n + 4 + uid_n + 1 + svc_n);
    put(b, "sf:{", 4);
    put(b, ns, ns_n);
    put(b, ":lk:", 4);
    put(b, uid, uid_n);
    put(b, "}", 1);
    put(b, svc, svc_n);
    put(b, "\r\n", 2);
}

static void push_waiter(int fd, uint32_t msgid) {
    if (waiters_count == waiters_cap) {
        size_t cap = waiters_cap ? waiters_cap * 2 : 1024;
        Waiter *w = malloc(cap * sizeof *w);
        if (!w) die("malloc");
        for (size_t i = 0; i < waiters_count; i++) {
            w[i] = waiters[(waiters_head + i) % waiters_cap];
        }
        free(waiters);
        waiters = w;
        waiters_cap = cap;
        waiters_head = 0;
    }
    Waiter *w = &waiters[(waiters_head + waiters_count) % waiters_cap];
    w->fd = fd;
    w->generation = clients[fd].generation;
    w->msgid = msgid;
    waiters_count++;
}

/* The request at the front of a client's bytes: how many bytes it took, NEED_MORE or BAD. */
static int handle_request(int fd, const uint8_t *start, const uint8_t *end) {
    Cursor c = {start, end};
    size_t n, nparams, method_n, ns_n, uid_n, svc_n;
    int64_t type, msgid, pod = 0, persist = 0;
    const uint8_t *method, *ns, *uid, *svc;
    int r;
    if ((r = read_array(&c, &n))) return r;
    if (n != 4) return BAD;
    if ((r = read_int(&c, &type))) return r;
    if ((r = read_int(&c, &msgid))) return r;
    if ((r = read_str(&c, &method, &method_n))) return r;
    if ((r = read_array(&c, &nparams))) return r;
    if (type != 0 || nparams < 3) return BAD;
    if ((r = read_str(&c, &ns, &ns_n))) return r;
    if ((r = read_str(&c, &uid, &uid_n))) return r;
    if ((r = read_str(&c, &svc, &svc_n))) return r;
    int is_set = method_n == 14 && memcmp(method, "set_linked_pod", 14) == 0;
    int is_get = method_n == 14 && memcmp(method, "get_linked_pod", 14) == 0;
    if (is_set) {
        if (nparams != 5) return BAD;
        if ((r = read_int(&c, &pod))) return r;
        if ((r = read_int(&c, &persist))) return r;
    } else if (!is_get || nparams != 3) {
        return BAD;
    }
    if (is_set) {
        put(&redis_out, "*8\r\n$7\r\nEVALSHA\r\n", 17);
        put_bulk(&redis_out, sha, strlen(sha));
        put(&redis_out, "$1\r\n2\r\n", 7);
        put_key(&redis_out, ns, ns_n, uid, uid_n, (const uint8_t *)"", 0);
        put_key(&redis_out, ns, ns_n, uid, uid_n, svc, svc_n);
        put_bulk(&redis_out, svc, svc_n);
        put_int_bulk(&redis_out, pod);
        put_int_bulk(&redis_out, persist);
    } else {
        put(&redis_out, "*2\r\n$3\r\nGET\r\n", 13);
        put_key(&redis_out, ns, ns_n, uid, uid_n, svc, svc_n);
    }
    push_waiter(fd, (uint32_t)msgid);
    return (int)(c.p - start);
}

/* --- replies: [1, msgid, nil, result] or [1, msgid, {code, message}, nil] ----------------------- */

static void put_msgpack_uint(Buffer *b, uint32_t v) {
    uint8_t buf[5];
    if (v <= 0x7f) { put_byte(b, (uint8_t)v); return; }
    if (v <= 0xff) { buf[0] = 0xcc; buf[1] = (uint8_t)v; put(b, buf, 2); return; }
    if (v <= 0xffff) { buf[0] = 0xcd; buf[1] = (uint8_t)(v >> 8); buf[2] = (uint8_t)v; put(b, buf, 3); return; }
    buf[0] = 0xce;
    for (int i = 0; i < 4; i++) {
        buf[1 + i] = (uint8_t)(v >> (24 - 8 * i));
    }
    put(b, buf, 5);
}

static void put_msgpack_int(Buffer *b, int64_t v) {
    if (v >= 0 && v <= 0x7f) { put_byte(b, (uint8_t)v); return; }
    if (v >= -32 && v < 0) { put_byte(b, (uint8_t)(0xe0 | (v & 0x1f))); return; }
    uint8_t buf[9] = {0xd3};
    for (int i = 0; i < 8; i++) {
        buf[1 + i] = (uint8_t)((uint64_t)v >> (56 - 8 * i));
    }
    put(b, buf, 9);
}

static const char INTERNAL_ERROR[] =
    "\x82" "\xa4" "code" "\xa8" "INTERNAL" "\xa7" "message" "\xab" "redis error";

enum { NIL, INTEGER, ERROR };

static void answer(int kind, int64_t value) {
    if (waiters_count == 0) {
        fprintf(stderr, "floor_c: a Redis reply nobody waits for\n");
        exit(1);
    }
    Waiter w = waiters[waiters_head];
    waiters_head = (waiters_head + 1) % waiters_cap;
    waiters_count--;
    Client *cl = &clients[w.fd];
    if (!cl->open || cl->generation != w.generation) {
        return; /* that client is gone */
    }
    Buffer *b = &cl->out;
    put_byte(b, 0x94);
    put_byte(b, 0x01);
    put_msgpack_uint(b, w.msgid);
    if (kind == ERROR) {
        put(b, INTERNAL_ERROR, sizeof INTERNAL_ERROR - 1);
        put_byte(b, 0xc0);
    } else {
        put_byte(b, 0xc0);
        if (kind == NIL) put_byte(b, 0xc0);
        else put_msgpack_int(b, value);
    }
    if (!cl->dirty) {
        cl->dirty = 1;
        dirty[dirty_count++] = w.fd;
    }
}

/* Answers every complete RESP reply in redis_in (nil, integer, bulk string of digits, error). */
static void handle_redis_replies(void) {
    for (;;) {
        const char *p = redis_in.data + redis_in.start;
        const char *end = redis_in.data + redis_in.len;
        if (p >= end) return;
        const char *eol = memchr(p, '\r', end - p);
        if (!eol || eol + 1 >= end) return;
        const char *next = eol + 2;
        if (*p == '$') {
            long n = strtol(p + 1, NULL, 10);
            if (n < 0) {
                answer(NIL, 0);
            } else {
                if (end - next < n + 2) return;
                answer(INTEGER, strtoll(next, NULL, 10)); /* stops at the \r after the digits */
                next += n + 2;
            }
        } else if (*p == ':') {
            answer(INTEGER, strtoll(p + 1, NULL, 10));
        } else if (*p == '-') {
            answer(ERROR, 0);
        } else if (*p == '+') {
            answer(NIL, 0);
        } else {
            fprintf(stderr, "floor_c: unexpected Redis reply type %c\n", *p);
            exit(1);
        }
        redis_in.start = next - redis_in.data;
    }
}

/* --- I/O ----------------------------------------------------------------------------------------- */

/* One read into the buffer; 0 on end of file or a hard error. */
static int read_into(int fd, Buffer *b) {
    reserve(b, READ_SIZE);
    ssize_t n = read(fd, b->data + b->len, READ_SIZE);
    if (n > 0) {
        b->len += n;
        return 1;
    }
    return n < 0 && (errno == EAGAIN || errno == EINTR);
}

/* Writes what the socket takes; 0 if bytes are left for the next turn. */
static int write_out(int fd, Buffer *b) {
    while (b->start < b->len) {
        ssize_t n = write(fd, b->data + b->start, b->len - b->start);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return 0;
            break; /* the peer is gone: its end of file is seen on read */
        }
        b->start += n;
    }
    b->start = b->len = 0;
    return 1;
}

static void close_client(int epfd, int fd) {
    Client *cl = &clients[fd];
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    cl->open = 0;
    cl->generation++;
    cl->in.start = cl->in.len = 0;
    cl->out.start = cl->out.len = 0;
}

static int unix_socket(const char *path, struct sockaddr_un *addr) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr->sun_path) {
        fprintf(stderr, "floor_c: socket path too long: %s\n", path);
        exit(1);
    }
    strcpy(addr->sun_path, path);
    return fd;
}

static void watch(int epfd, int fd) {
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: floor_c SOCKET REDIS_SOCKET SET_LINKED_POD_SHA\n");
        return 2;
    }
    sha = argv[3];
    struct sockaddr_un addr;

    int redis_fd = unix_socket(argv[2], &addr);
    if (connect(redis_fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect to Redis");
    if (fcntl(redis_fd, F_SETFL, O_NONBLOCK) < 0) die("fcntl");

    int listen_fd = unix_socket(argv[1], &addr);
    unlink(argv[1]);
    if (bind(listen_fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(listen_fd, 1024) < 0) die("listen");
    if (fcntl(listen_fd, F_SETFL, O_NONBLOCK) < 0) die("fcntl");

    int epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    watch(epfd, listen_fd);
    watch(epfd, redis_fd);
    printf("ready\n");
    fflush(stdout);

    struct epoll_event events[256];
    int pending_out = 0; /* a write stopped at EAGAIN: poll without sleeping until it is done */
    for (;;) {
        int n = epoll_wait(epfd, events, 256, pending_out ? 0 : -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listen_fd) {
                int c;
                while ((c = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    if (c >= MAX_FDS) {
                        close(c);
                        continue;
                    }
                    clients[c].open = 1;
                    clients[c].dirty = 0;
                    watch(epfd, c);
                }
            } else if (fd == redis_fd) {
                if (!read_into(redis_fd, &redis_in)) {
                    fprintf(stderr, "floor_c: Redis closed the connection\n");
                    return 1;
                }
                handle_redis_replies();
            } else {
                Client *cl = &clients[fd];
                if (!read_into(fd, &cl->in)) {
                    close_client(epfd, fd);
                    continue;
                }
                while (cl->in.start < cl->in.len) {
                    const uint8_t *p = (const uint8_t *)cl->in.data + cl->in.start;
                    const uint8_t *end = (const uint8_t *)cl->in.data + cl->in.len;
                    int used = handle_request(fd, p, end);
                    if (used == NEED_MORE) break;
                    if (used == BAD) {
                        close_client(epfd, fd);
                        break;
                    }
                    cl->in.start += used;
                }
            }
        }
        /* One write to Redis per turn, one write per client with replies. */
        pending_out = !write_out(redis_fd, &redis_out);
        int kept = 0;
        for (int i = 0; i < dirty_count; i++) {
            int fd = dirty[i];
            if (clients[fd].open && !write_out(fd, &clients[fd].out)) {
                dirty[kept++] = fd; /* the rest goes out next turn */
                pending_out = 1;
                continue;
            }
            clients[fd].dirty = 0;
        }
        dirty_count = kept;
    }
}
