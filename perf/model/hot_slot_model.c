/*
 * Fresh lines against reused lines: why fabric rings have a hot slot.
 *
 * Two pinned threads ping-pong a message three ways, switching every
 * block of BLOCK round trips so that all three see the same machine state
 * (these hosts change speed every few minutes):
 *   floor - one cache line bounced between the cores (as nefele-perf's);
 *   hot   - one 128-byte slot per direction, reused for every message:
 *           the producer waits until the consumer's `taken` word says it
 *           took the last one, copies the payload in, commits with xchg;
 *           the consumer spins on the commit word (prefetching the slot's
 *           second line), copies the payload out and writes `taken`;
 *   ring  - a 256 KiB ring per direction whose line-aligned records hold
 *           a commit word, the length and the payload: each message lands
 *           on fresh lines (the ring protocol of fabric::ring without its
 *           hot slot; see ring_model.c for the whole protocol).
 * Each block's p50 is divided by the floor's p50 in the same block triple;
 * the medians of those ratios are printed, over all triples and over the
 * triples whose floor was under 150 ns (the host's "near" phase).
 *
 *   cc -O2 -pthread -o /tmp/hot_slot_model perf/model/hot_slot_model.c
 *   /tmp/hot_slot_model [payload bytes, 1-104] [core a] [core b]
 */
#include "model.h"

#include <stdatomic.h>
#include <string.h>

enum { BLOCK = 2000, TRIPLES = 100, MODES = 3, LINE = 64, RING_BYTES = 256 << 10 };
enum { FLOOR, HOT, RING };
static const char *mode_name[MODES] = {"floor", "hot", "ring"};

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
};

static size_t payload = 64;
static int core[2] = {0, 1};
static struct hot *slot[2];
static struct ring *rings[2];
static struct {
	_Alignas(LINE) _Atomic uint64_t word;
} floor_line;
static uint64_t ticks[MODES][TRIPLES][BLOCK];

static void hot_send(struct hot *h, uint64_t seq, const unsigned char *msg)
{
	while (atomic_load_explicit(&h->taken, memory_order_acquire) != seq - 1)
		_mm_pause();
	h->len = (uint32_t)payload;
	memcpy(h->data, msg, payload);
	atomic_exchange_explicit(&h->commit, seq, memory_order_seq_cst);
}

static void hot_recv(struct hot *h, uint64_t seq, unsigned char *out)
{
	while (atomic_load_explicit(&h->commit, memory_order_acquire) != seq) {
		_mm_prefetch((const char *)h + LINE, _MM_HINT_T0);
		_mm_pause();
	}
	memcpy(out, h->data, h->len);
	atomic_store_explicit(&h->taken, seq, memory_order_release);
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
			hot_send(slot[me], s->seq, buf);
			hot_recv(slot[other], s->seq, buf);
		} else {
			hot_recv(slot[other], s->seq, buf);
			hot_send(slot[me], s->seq, buf);
		}
		break;
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
	for (int t = 0; t < TRIPLES; t++)
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
		rings[k] = aligned_alloc(4096, sizeof(struct ring));
		if (!slot[k] || !rings[k]) {
			fprintf(stderr, "out of memory\n");
			return 1;
		}
		memset(slot[k], 0, 4096);
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
	for (int tr = 0; tr < TRIPLES; tr++)
		for (int m = 0; m < MODES; m++)
			for (int i = 0; i < BLOCK; i++) {
				uint64_t t0 = __rdtsc();
				exchange(m, 0, &s, buf);
				ticks[m][tr][i] = __rdtsc() - t0;
			}
	pthread_join(t, NULL);

	static double p50[MODES][TRIPLES], ratio[MODES][TRIPLES], near[MODES][TRIPLES];
	int n_near = 0;
	for (int tr = 0; tr < TRIPLES; tr++) {
		for (int m = 0; m < MODES; m++) {
			qsort(ticks[m][tr], BLOCK, sizeof(uint64_t), cmp_u64);
			p50[m][tr] = ticks[m][tr][BLOCK / 2] / f;
		}
		for (int m = 0; m < MODES; m++)
			ratio[m][tr] = p50[m][tr] / p50[FLOOR][tr];
		if (p50[FLOOR][tr] < 150) {
			for (int m = 0; m < MODES; m++)
				near[m][n_near] = ratio[m][tr];
			n_near++;
		}
	}
	printf("payload %zu B, %d block triples of %d round trips (rdtsc, %.3f ticks/ns)\n", payload,
	       TRIPLES, BLOCK, f);
	for (int m = 0; m < MODES; m++) {
		double ns = median(p50[m], TRIPLES);
		double r_all = median(ratio[m], TRIPLES);
		double r_near = median(near[m], n_near);
		printf("  %-5s p50 median %5.0f ns   / floor: median %.2f (all), %.2f (%d near-phase triples)\n",
		       mode_name[m], ns, r_all, r_near, n_near);
	}
	return 0;
}
