/* delayswitch: the switch of an emulated cluster on kernels without sch_netem.
 *
 * It makes one TAP device, named st0, inside each rank's network namespace and forwards the
 * Ethernet frames the ranks send between them, each after a fixed one-way latency and through
 * a token bucket on the receiving rank's port (the download direction of its link; the upload
 * direction is shaped by a tbf qdisc on st0, as on the veth links). So a message between two
 * ranks sees the latency once and both ends' bandwidth, as on a non-blocking switch.
 *
 * Usage: delayswitch PARENT_PID LATENCY_NS RATE_BITS_PER_S BURST_BYTES LIMIT_BYTES NETNS_PATH...
 *   PARENT_PID: the process that starts it (it exits if that one is already gone);
 *   NETNS_PATH: the namespaces of rank 0, 1, ... (e.g. /var/run/netns/st-1-ab-0).
 * It prints "ready" on stdout once every TAP exists, then runs until killed. The TAPs belong to
 * this process: they disappear when it exits, and it exits when its parent (thread) does. It
 * also exits, with a message, when a TAP fails (its device was deleted).
 *
 * Frames travel with a virtio-net header (IFF_VNET_HDR) and the TAPs accept TSO, so TCP hands
 * over 64 KiB segments as on veth, not one frame per 1500 bytes. Ranks are told apart by the
 * MAC address the caller gives each st0: 02:53:54:00:HH:LL for rank 0xHHLL. Frames to any
 * other address (broadcast, multicast) go to every other rank. A port's queue holds at most
 * LIMIT_BYTES besides the frames still waiting out their latency (netem's delay line is apart
 * from tbf's queue too); frames beyond are dropped, as a full tbf queue drops them. The bucket
 * charges a TSO segment its length, with one set of headers, where tbf charges each packet its
 * own: with 66 bytes of headers a 1448-byte TCP packet, the download direction can pass up to
 * about 4.5% more payload than a tbf of the same rate (the upload direction, a tbf, is exact).
 *
 * Timer slack is 1 ns and the process runs at nice -10 (it needs root anyway, for setns), so
 * a frame leaves within some microseconds of its due time on an idle machine. Linux only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <limits.h>
#include <time.h>
#include <unistd.h>

#define VNET_HDR 10 /* sizeof(struct virtio_net_hdr) */
/* The largest frame a TAP returns: 64 KiB of TSO segment plus headers; one of exactly this
 * size may have been cut short by the read, and is dropped. */
#define FRAME_MAX (VNET_HDR + 65536 + 256)
#define READS_PER_WAKE 64

typedef struct packet {
    struct packet *next;
    int64_t due_ns;
    int len;
    unsigned char data[];
} packet;

typedef struct {
    int fd;
    packet *head, *tail;
    int64_t queued;      /* bytes waiting */
    double tokens;       /* token bucket of the download direction, bytes */
    int64_t tokens_ns;   /* when tokens was last brought up to date */
    int64_t last_due_ns; /* departures stay in order */
    uint64_t dropped;
} port;

static int64_t latency_ns;
static double rate_bytes_per_ns, burst_bytes;
static int64_t limit_bytes;
static int nports;
static port *ports;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static long long parse_int(const char *text, const char *what, long long lo, long long hi) {
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || *end || v < lo || v > hi) {
        fprintf(stderr, "delayswitch: %s must be an integer in [%lld, %lld], got '%s'\n", what,
                lo, hi, text);
        exit(2);
    }
    return v;
}

static void die(const char *what) {
    fprintf(stderr, "delayswitch: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int open_tap(const char *netns_path) {
    int ns = open(netns_path, O_RDONLY | O_CLOEXEC);
    if (ns < 0) die(netns_path);
    if (setns(ns, CLONE_NEWNET) != 0) die("setns");
    close(ns);
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    strncpy(ifr.ifr_name, "st0", IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) != 0) die("TUNSETIFF st0");
    unsigned offload = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
    if (ioctl(fd, TUNSETOFFLOAD, offload) != 0) die("TUNSETOFFLOAD");
    return fd;
}

/* The rank a frame is addressed to, or -1 for every rank but the sender. */
static int destination(const unsigned char *frame) {
    const unsigned char *mac = frame + VNET_HDR;
    if (mac[0] != 0x02 || mac[1] != 0x53 || mac[2] != 0x54 || mac[3] != 0x00) return -1;
    int rank = (mac[4] << 8) | mac[5];
    return rank < nports ? rank : -1;
}

/* Queue a copy of the frame on port p; it leaves after the latency, once the port's token
 * bucket holds its length (tbf's rule), and never before the frame queued ahead of it. */
static void enqueue(int p, const unsigned char *frame, int len, int64_t arrived_ns) {
    port *q = &ports[p];
    int wire = len - VNET_HDR;
    if (q->queued + wire > limit_bytes) {
        q->dropped++;
        return;
    }
    packet *pk = malloc(sizeof(packet) + (size_t)len);
    if (!pk) {
        q->dropped++;
        return;
    }
    memcpy(pk->data, frame, (size_t)len);
    pk->len = len;
    pk->next = NULL;
    int64_t t = arrived_ns + latency_ns;
    if (t < q->last_due_ns) t = q->last_due_ns;
    double tokens = q->tokens + (double)(t - q->tokens_ns) * rate_bytes_per_ns;
    if (tokens > burst_bytes) tokens = burst_bytes;
    /* Wait for the missing tokens; a frame larger than the burst waits as if the bucket could
     * fill up to its length. */
    if (tokens < wire) {
        t += (int64_t)((wire - tokens) / rate_bytes_per_ns) + 1;
        tokens = wire;
    }
    q->tokens = tokens - wire;
    q->tokens_ns = t;
    q->last_due_ns = t;
    pk->due_ns = t;
    if (q->tail)
        q->tail->next = pk;
    else
        q->head = pk;
    q->tail = pk;
    q->queued += wire;
}

/* Deliver every frame that is due; return the earliest due time still queued (or -1). */
static int64_t deliver(int64_t t) {
    int64_t next = -1;
    for (int p = 0; p < nports; p++) {
        port *q = &ports[p];
        while (q->head && q->head->due_ns <= t) {
            packet *pk = q->head;
            /* A write into a TAP is a receive on its namespace's side; it does not block. A
             * failure (the link is down) drops the frame, as a wire would. */
            if (write(q->fd, pk->data, (size_t)pk->len) < 0) q->dropped++;
            q->head = pk->next;
            if (!q->head) q->tail = NULL;
            q->queued -= pk->len - VNET_HDR;
            free(pk);
        }
        if (q->head && (next < 0 || q->head->due_ns < next)) next = q->head->due_ns;
    }
    return next;
}

int main(int argc, char **argv) {
    if (argc < 8) {
        fprintf(stderr,
                "usage: delayswitch PARENT_PID LATENCY_NS RATE_BITS_PER_S BURST_BYTES "
                "LIMIT_BYTES NETNS_PATH NETNS_PATH...\n");
        return 2;
    }
    pid_t parent = (pid_t)parse_int(argv[1], "PARENT_PID", 1, INT_MAX);
    latency_ns = parse_int(argv[2], "LATENCY_NS", 0, 3600LL * 1000000000LL);
    double rate = (double)parse_int(argv[3], "RATE_BITS_PER_S", 1, LLONG_MAX / 2);
    burst_bytes = (double)parse_int(argv[4], "BURST_BYTES", 1, 1LL << 40);
    limit_bytes = parse_int(argv[5], "LIMIT_BYTES", 1, 1LL << 40);
    rate_bytes_per_ns = rate / 8e9;
    /* Frames waiting out their latency do not count against the queue's limit. */
    limit_bytes += (int64_t)(rate_bytes_per_ns * (double)latency_ns);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) {
        fprintf(stderr, "delayswitch: the process that started it (%d) is gone\n", (int)parent);
        return 1;
    }
    prctl(PR_SET_TIMERSLACK, 1UL);

    nports = argc - 6;
    struct rlimit files;
    if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < (rlim_t)nports + 64) {
        files.rlim_cur = (rlim_t)nports + 64;
        if (files.rlim_max != RLIM_INFINITY && files.rlim_cur > files.rlim_max)
            files.rlim_max = files.rlim_cur; /* root may raise the hard limit */
        setrlimit(RLIMIT_NOFILE, &files);
    }
    ports = calloc((size_t)nports, sizeof(port));
    struct pollfd *pfd = calloc((size_t)nports, sizeof(struct pollfd));
    unsigned char *buf = malloc(FRAME_MAX);
    if (!ports || !pfd || !buf) die("calloc");
    int home = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (home < 0) die("/proc/self/ns/net");
    int64_t start = now_ns();
    for (int p = 0; p < nports; p++) {
        ports[p].fd = open_tap(argv[6 + p]);
        ports[p].tokens = burst_bytes;
        ports[p].tokens_ns = start;
        pfd[p].fd = ports[p].fd;
        pfd[p].events = POLLIN;
    }
    if (setns(home, CLONE_NEWNET) != 0) die("setns back");
    close(home);
    /* Forwarding is short work that the ranks' latency waits on: run ahead of them. */
    if (setpriority(PRIO_PROCESS, 0, -10) != 0) fprintf(stderr, "delayswitch: nice -10 refused\n");
    printf("ready\n");
    fflush(stdout);

    int64_t next = -1;
    for (;;) {
        struct timespec ts, *timeout = NULL;
        if (next >= 0) {
            int64_t wait = next - now_ns();
            if (wait < 0) wait = 0;
            ts.tv_sec = wait / 1000000000;
            ts.tv_nsec = wait % 1000000000;
            timeout = &ts;
        }
        int n = ppoll(pfd, (nfds_t)nports, timeout, NULL);
        if (n < 0 && errno != EINTR) die("ppoll");
        if (n > 0) {
            for (int p = 0; p < nports; p++) {
                if (pfd[p].revents & (POLLERR | POLLHUP | POLLNVAL)) {
                    /* The TAP's device is gone: the cluster is broken, and polling on would
                     * spin. Exit; the cluster sees it and reports this message. */
                    fprintf(stderr, "delayswitch: rank %d's link failed (its st0 was deleted?)\n",
                            p);
                    return 1;
                }
                if (!(pfd[p].revents & POLLIN)) continue;
                for (int r = 0; r < READS_PER_WAKE; r++) {
                    ssize_t len = read(ports[p].fd, buf, FRAME_MAX);
                    if (len < 0) {
                        if (errno == EAGAIN || errno == EINTR) break; /* drained */
                        fprintf(stderr, "delayswitch: reading rank %d's link: %s\n", p,
                                strerror(errno));
                        return 1;
                    }
                    if (len >= FRAME_MAX) { /* cut short by the read: no use to anyone */
                        ports[p].dropped++;
                        continue;
                    }
                    if (len < VNET_HDR + 14) continue;
                    int64_t t = now_ns();
                    int dst = destination(buf);
                    if (dst == p) continue;
                    if (dst >= 0) {
                        enqueue(dst, buf, (int)len, t);
                    } else {
                        for (int d = 0; d < nports; d++)
                            if (d != p) enqueue(d, buf, (int)len, t);
                    }
                }
            }
        }
        next = deliver(now_ns());
    }
}
