/*
 * Fresh lines against reused lines, and one line against two: why fabric
 * rings have a hot slot, and what it costs when the cores are far apart.
 *
 * Two pinned threads ping-pong a message five ways, switching every
 * block of BLOCK round trips so that all see the same machine state
 * (these hosts change speed within seconds):
 *   floor   - one cache line bounced between the cores (as nefele-perf's);
 *   hot     - one 128-byte slot per direction, reused for every message:
 *             the producer claims both lines (prefetchw), waits until the
 *             consumer's `taken` word says it took the last one, copies
 *             the payload in, commits with xchg; the consumer spins on the
 *             commit word (prefetching the slot's second line), copies the
 *             payload out and writes `taken` (fabric::ring's hot slot);
 *   ring    - a 256 KiB ring per direction whose line-aligned records hold
 *             a commit word, the length and the payload: each message
 *             lands on fresh lines (the ring protocol of fabric::ring
 *             without its hot slot; see ring_model.c for the whole one);
 *   shared  - one 128-byte slot for both directions: the reply goes into
 *             the lines the request came in (no `taken` word: in a
 *             ping-pong each side's message says it took the other's);
 *   shared1 - as shared, with the message cut to 40 bytes so that it
 *             travels in the slot's first line only.
 * Each block's p50 is divided by the floor's p50 in the same round of
 * blocks; the medians of those ratios are printed over the rounds whose
 * floor was under 150 ns (the host's "near" phase) and over the others.
 *
 *   cc -O2 -pthread -o /tmp/hot_slot_model perf/model/hot_slot_model.c
 *   /tmp/hot_slot_model [payload bytes, 1-104] [core a] [core b]
 */
#include "model.h"

#include <stdatomic.h>
#include <string.h>

enum { BLOCK = 2000, ROUNDS = 100, MODES = 5, LINE = 64, RING_BYTES = 256 << 10, LINE1 = 40 };
enum { FLOOR, HOT, RING, SHARED, SHARED1 };
static const char *mode_name[MODES] = {"floor", "hot", "ring", "shared", "shared1"};

struct hot {
	_Alignas(LINE) _Atomic uint64_t commit;
	_Atomic uint64_t taken;
	uint32_t len;
	unsigned char data[104];
};

struct ring {
	_Alignas(LINE) unsigned char data[RING_BYTES];
};

struct side {
	uint64_t seq;  /* hot slot messages sent (and received) by this side */
	uint64_t pos[2]; /* ring positions: [0] the ring it sends on, [1] the one it reads */
	uint64_t bounce;
	uint64_t turn; /* round trips through the shared slots */
};

static size_t payload = 64;
static int core[2] = {0, 1};
static struct hot *slot[2], *shared[2];
static struct ring *rings[2];
static struct {
	_Alignas(LINE) _Atomic uint64_t word;
} floor_line;
static uint64_t ticks[MODES][ROUNDS][BLOCK];

/* Claims a slot's lines for writing before anything else touches them. */
static void claim(struct hot *h, size_t len)
{
	__asm__ volatile("prefetchw (%0)" ::"r"(h));
	if (len > LINE1)
		__asm__ volatile("prefetchw (%0)" ::"r"((const char *)h + LINE));
}

/* Puts `len` bytes in the slot under commit word `stamp`; with `taken`,
 * first waits until the consumer took message `stamp - 1`. */
static void slot_send(struct hot *h, uint64_t stamp, const unsigned char *msg, size_t len, int taken)
{
	claim(h, len);
	while (taken && atomic_load_explicit(&h->taken, memory_order_acquire) != stamp - 1)
		_mm_pause();
	h->len = (uint32_t)len;
	memcpy(h->data, msg, len);
	atomic_exchange_explicit(&h->commit, stamp, memory_order_seq_cst);
}

/* Waits for commit word `stamp` (prefetching the second line if the
 * message reaches it), takes the message and, with `taken`, says so. */
static void slot_recv(struct hot *h, uint64_t stamp, unsigned char *out, size_t len, int taken)
{
	while (atomic_load_explicit(&h->commit, memory_order_acquire) != stamp) {
		if (len > LINE1)
			_mm_prefetch((const char *)h + LINE, _MM_HINT_T0);
		_mm_pause();
	}
	memcpy(out, h->data, h->len);
	if (taken)
		atomic_store_explicit(&h->taken, stamp, memory_order_release);
}

static uint64_t record_bytes(void)
{
	return (16 + payload + LINE - 1) & ~(uint64_t)(LINE - 1);
}

static void ring_send(struct ring *r, uint64_t *pos, const unsigned char *msg)
{
	unsigned char *rec = r->data + (*pos & (RING_BYTES - 1));
	memcpy(rec + 8, &(uint32_t){(uint32_t)payload}, 4);
	memcpy(rec + 16, msg, payload);
	atomic_exchange_explicit((_Atomic uint64_t *)rec, *pos + 1, memory_order_seq_cst);
	*pos += record_bytes();
}

static void ring_recv(struct ring *r, uint64_t *pos, unsigned char *out)
{
	unsigned char *rec = r->data + (*pos & (RING_BYTES - 1));
	while (atomic_load_explicit((_Atomic uint64_t *)rec, memory_order_acquire) != *pos + 1) {
		_mm_prefetch((const char *)rec + LINE, _MM_HINT_T0);
		_mm_pause();
	}
	uint32_t len;
	memcpy(&len, rec + 8, 4);
	memcpy(out, rec + 16, len);
	*pos += record_bytes();
}

/* One round trip of `mode`; `me` is 0 for the timing side, 1 for the echo. */
static void exchange(int mode, int me, struct side *s, unsigned char *buf)
{
	const int other = 1 - me;
	switch (mode) {
	case FLOOR:
		s->bounce++;
		if (me == 0) {
			atomic_store_explicit(&floor_line.word, 2 * s->bounce - 1, memory_order_release);
			while (atomic_load_explicit(&floor_line.word, memory_order_acquire) != 2 * s->bounce)
				_mm_pause();
		} else {
			while (atomic_load_explicit(&floor_line.word, memory_order_acquire) != 2 * s->bounce - 1)
				_mm_pause();
			atomic_store_explicit(&floor_line.word, 2 * s->bounce, memory_order_release);
		}
		break;
	case HOT:
		s->seq++;
		if (me == 0) {
			slot_send(slot[me], s->seq, buf, payload, 1);
			slot_recv(slot[other], s->seq, buf, payload, 1);
		} else {
			slot_recv(slot[other], s->seq, buf, payload, 1);
			slot_send(slot[me], s->seq, buf, payload, 1);
		}
		break;
	case SHARED:
	case SHARED1: {
		/* One slot each mode; side 0 commits odd stamps, side 1 even. */
		struct hot *h = shared[mode - SHARED];
		size_t len = mode == SHARED1 && payload > LINE1 ? LINE1 : payload;
		s->turn++;
		uint64_t mine = 2 * s->turn - 1 + me, theirs = 2 * s->turn - me;
		if (me == 0) {
			slot_send(h, mine, buf, len, 0);
			slot_recv(h, theirs, buf, len, 0);
		} else {
			slot_recv(h, theirs, buf, len, 0);
			slot_send(h, mine, buf, len, 0);
		}
		break;
	}
	case RING:
		if (me == 0) {
			ring_send(rings[me], &s->pos[0], buf);
			ring_recv(rings[other], &s->pos[1], buf);
		} else {
			ring_recv(rings[other], &s->pos[1], buf);
			ring_send(rings[me], &s->pos[0], buf);
		}
		break;
	}
}

static void *echo(void *arg)
{
	(void)arg;
	unsigned char buf[256] = {0};
	struct side s = {0};
	pin(core[1]);
	for (int t = 0; t < ROUNDS; t++)
		for (int m = 0; m < MODES; m++)
			for (int i = 0; i < BLOCK; i++)
				exchange(m, 1, &s, buf);
	return NULL;
}

static double median(double *v, int n)
{
	qsort(v, n, sizeof *v, cmp_double);
	return n ? v[n / 2] : 0;
}

int main(int argc, char **argv)
{
	if (!parse_args(argc, argv, &payload, core) || payload == 0 ||
	    payload > sizeof slot[0]->data || RING_BYTES % record_bytes() != 0) {
		fprintf(stderr, "usage: hot_slot_model [payload bytes, 1-%zu, whose record (16 + payload, "
				"rounded up to 64) divides 256 KiB] [core a] [core b]\n",
			sizeof slot[0]->data);
		return 2;
	}
	for (int k = 0; k < 2; k++) {
		slot[k] = aligned_alloc(4096, 4096);
		shared[k] = aligned_alloc(4096, 4096);
		rings[k] = aligned_alloc(4096, sizeof(struct ring));
		if (!slot[k] || !shared[k] || !rings[k]) {
			fprintf(stderr, "out of memory\n");
			return 1;
		}
		memset(slot[k], 0, 4096);
		memset(shared[k], 0, 4096);
		memset(rings[k], 0, sizeof(struct ring));
	}
	double f = calibrate();
	unsigned char buf[256];
	memset(buf, 7, sizeof buf);
	struct side s = {0};
	pthread_t t;
	if (pthread_create(&t, NULL, echo, NULL)) {
		fprintf(stderr, "cannot start the echo thread\n");
		return 1;
	}
	pin(core[0]);
	for (int tr = 0; tr < ROUNDS; tr++)
		for (int m = 0; m < MODES; m++)
			for (int i = 0; i < BLOCK; i++) {
				uint64_t t0 = __rdtsc();
				exchange(m, 0, &s, buf);
				ticks[m][tr][i] = __rdtsc() - t0;
			}
	pthread_join(t, NULL);

	/* Ratios to the floor of the same round, near- and far-phase rounds apart. */
	static double p50[MODES][ROUNDS], ratio[2][MODES][ROUNDS];
	int n[2] = {0, 0};
	for (int r = 0; r < ROUNDS; r++) {
		for (int m = 0; m < MODES; m++) {
			qsort(ticks[m][r], BLOCK, sizeof(uint64_t), cmp_u64);
			p50[m][r] = ticks[m][r][BLOCK / 2] / f;
		}
		int far = p50[FLOOR][r] >= 150;
		for (int m = 0; m < MODES; m++)
			ratio[far][m][n[far]] = p50[m][r] / p50[FLOOR][r];
		n[far]++;
	}
	printf("payload %zu B (shared1: %d B), %d rounds of %d round trips per mode (rdtsc, %.3f "
	       "ticks/ns); near: rounds whose floor was under 150 ns\n",
	       payload, payload > LINE1 ? LINE1 : (int)payload, ROUNDS, BLOCK, f);
	for (int m = 0; m < MODES; m++) {
		printf("  %-7s p50 median %5.0f ns   / floor: median", mode_name[m], median(p50[m], ROUNDS));
		for (int far = 0; far < 2; far++)
			if (n[far])
				printf(" %.2f (%d %s)", median(ratio[far][m], n[far]), n[far], far ? "far" : "near");
		printf("\n");
	}
	return 0;
}
