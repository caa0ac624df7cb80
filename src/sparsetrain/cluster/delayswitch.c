/* delayswitch: the switch of an emulated cluster on kernels without sch_netem.
 *
 * It makes one TAP device, named st0, inside each rank's network namespace and forwards the
 * Ethernet frames the ranks send between them, each after a fixed one-way latency and through
 * a token bucket on the receiving rank's port (the download direction of its link; the upload
 * direction is shaped by a tbf qdisc on st0, as on the veth links). So a message between two
 * ranks sees the latency once and both ends' bandwidth, as on a non-blocking switch.
 *
 * Usage: delayswitch LATENCY_NS RATE_BITS_PER_S BURST_BYTES LIMIT_BYTES NETNS_PATH...
 *   NETNS_PATH: the namespaces of rank 0, 1, ... (e.g. /var/run/netns/st-1-ab-0).
 * It prints "ready" on stdout once every TAP exists, then runs until killed. The TAPs belong to
 * this process: they disappear when it exits, and it exits when its parent does.
 *
 * Frames travel with a virtio-net header (IFF_VNET_HDR) and the TAPs accept TSO, so TCP hands
 * over 64 KiB segments as on veth, not one frame per 1500 bytes. Ranks are told apart by the
 * MAC address the caller gives each st0: 02:53:54:00:HH:LL for rank 0xHHLL. Frames to any
 * other address (broadcast, multicast) go to every other rank. A port's queue holds at most
 * LIMIT_BYTES; frames beyond are dropped, as a full tbf queue drops them.
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
#include <time.h>
#include <unistd.h>

#define VNET_HDR 10 /* sizeof(struct virtio_net_hdr) */
#define FRAME_MAX (VNET_HDR + 65536 + 64)
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
    if (argc < 7) {
        fprintf(stderr,
                "usage: delayswitch LATENCY_NS RATE_BITS_PER_S BURST_BYTES LIMIT_BYTES "
                "NETNS_PATH NETNS_PATH...\n");
        return 2;
    }
    latency_ns = strtoll(argv[1], NULL, 10);
    double rate = strtod(argv[2], NULL);
    burst_bytes = strtod(argv[3], NULL);
    limit_bytes = strtoll(argv[4], NULL, 10);
    if (latency_ns < 0 || !(rate > 0) || !(burst_bytes > 0) || limit_bytes <= 0) {
        fprintf(stderr, "delayswitch: need latency >= 0 and rate, burst and limit > 0\n");
        return 2;
    }
    rate_bytes_per_ns = rate / 8e9;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) return 1; /* the parent is already gone */
    prctl(PR_SET_TIMERSLACK, 1UL);

    nports = argc - 5;
    ports = calloc((size_t)nports, sizeof(port));
    struct pollfd *pfd = calloc((size_t)nports, sizeof(struct pollfd));
    unsigned char *buf = malloc(FRAME_MAX);
    if (!ports || !pfd || !buf) die("calloc");
    int home = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (home < 0) die("/proc/self/ns/net");
    int64_t start = now_ns();
    for (int p = 0; p < nports; p++) {
        ports[p].fd = open_tap(argv[5 + p]);
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
                if (!(pfd[p].revents & POLLIN)) continue;
                for (int r = 0; r < READS_PER_WAKE; r++) {
                    ssize_t len = read(ports[p].fd, buf, FRAME_MAX);
                    if (len < 0) break; /* EAGAIN: drained */
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
