/* tap_gen: a host-side traffic source for benches/python/bench_net.py (TAP -> driver).

   Writes 64-byte Ethernet/IPv4/UDP frames out of one interface as fast as it can: an AF_PACKET
   socket bound to the interface, PACKET_QDISC_BYPASS (straight to the driver's xmit, for a TAP
   tun_net_xmit: into the TAP's queue, dropped and counted in its tx_dropped when full),
   sendmmsg batches of BATCH frames.

   usage: tap_gen IFNAME DST_MAC [SRC_MAC [BATCH]]
   Runs until SIGTERM/SIGINT; on SIGUSR1, and at the end, prints one line
   "tap_gen: sent=N errors=E" (frames the kernel accepted so far, failed sendmmsg calls) on stdout.

   Build: gcc -O2 -o tap_gen tap_gen.c (bench_net.py does it into its temporary folder). */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define FRAME_LEN 64
#define MAX_BATCH 1024

static volatile sig_atomic_t report, done;

static void on_usr1(int sig) { (void)sig; report = 1; }
static void on_term(int sig) { (void)sig; done = 1; }

static int parse_mac(const char *s, uint8_t mac[6]) {
    unsigned m[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]) != 6) return -1;
    for (int i = 0; i < 6; i++) mac[i] = (uint8_t)m[i];
    return 0;
}

static uint16_t ip_checksum(const uint8_t *p, size_t n) {
    uint32_t sum = 0;
    for (size_t i = 0; i + 1 < n; i += 2) sum += (uint32_t)(p[i] << 8 | p[i + 1]);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: %s IFNAME DST_MAC [SRC_MAC [BATCH]]\n", argv[0]);
        return 2;
    }
    uint8_t frame[FRAME_LEN] = {0};
    uint8_t src[6] = {0x02, 0, 0, 0, 0, 0x01};
    if (parse_mac(argv[2], frame) || (argc > 3 && parse_mac(argv[3], src))) {
        fprintf(stderr, "tap_gen: bad MAC address\n");
        return 2;
    }
    int batch = argc > 4 ? atoi(argv[4]) : 256;
    if (batch < 1 || batch > MAX_BATCH) batch = 256;
    unsigned ifindex = if_nametoindex(argv[1]);
    if (!ifindex) {
        perror("tap_gen: if_nametoindex");
        return 1;
    }

    /* Ethernet, IPv4 198.18.0.2 -> 198.18.0.1 (testpmd txonly's addresses reversed), UDP 9 -> 9 */
    memcpy(frame + 6, src, 6);
    frame[12] = 0x08, frame[13] = 0x00;
    uint8_t *ip = frame + 14, *udp = ip + 20;
    ip[0] = 0x45, ip[8] = 64, ip[9] = 17;
    ip[2] = (FRAME_LEN - 14) >> 8, ip[3] = (FRAME_LEN - 14) & 0xff;
    ip[12] = 198, ip[13] = 18, ip[14] = 0, ip[15] = 2;
    ip[16] = 198, ip[17] = 18, ip[18] = 0, ip[19] = 1;
    uint16_t csum = ip_checksum(ip, 20);
    ip[10] = csum >> 8, ip[11] = csum & 0xff;
    udp[1] = 9, udp[3] = 9;
    udp[4] = (FRAME_LEN - 34) >> 8, udp[5] = (FRAME_LEN - 34) & 0xff;

    int fd = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: this socket receives nothing */
    if (fd < 0) {
        perror("tap_gen: socket(AF_PACKET)");
        return 1;
    }
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_ifindex = (int)ifindex};
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) {
        perror("tap_gen: bind");
        return 1;
    }
    int one = 1, sndbuf = 4 << 20;
    if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one) < 0)
        perror("tap_gen: PACKET_QDISC_BYPASS (going through the qdisc)");
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);

    static struct mmsghdr msgs[MAX_BATCH];
    struct iovec iov = {.iov_base = frame, .iov_len = FRAME_LEN};
    for (int i = 0; i < batch; i++) {
        msgs[i].msg_hdr.msg_iov = &iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);

    unsigned long long sent = 0, errors = 0;
    while (!done) {
        int n = sendmmsg(fd, msgs, (unsigned)batch, 0);
        if (n > 0)
            sent += (unsigned long long)n;
        else if (n < 0 && errno != EINTR)
            errors++;
        if (report) {
            report = 0;
            printf("tap_gen: sent=%llu errors=%llu\n", sent, errors);
        }
    }
    printf("tap_gen: sent=%llu errors=%llu\n", sent, errors);
    return 0;
}
