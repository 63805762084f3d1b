/*
 * The fabric's ring protocol with nothing around it, in C, next to the
 * cache-line floor, measured the same way in alternating rounds: how close
 * to the floor can the protocol itself get on this machine?
 *
 *   cc -O2 -pthread -o /tmp/ring_model perf/model/ring_model.c
 *   /tmp/ring_model [payload bytes, default 64] [core a] [core b]
 *
 * Two threads pinned to two cores bounce a message back and forth.
 *
 * floor: one 8-byte counter on one cache line, as `nefele-perf`'s floor.
 * ring:  what fabric::ring does for a reliable message that fits, per
 *        direction: a record of a 16-byte header (commit word, length,
 *        flags) and the payload, aligned to a cache line, in a 256 KiB
 *        ring; the producer copies the payload, publishes the record by
 *        swapping its stamp into the commit word (a full barrier), then
 *        loads the receiver's doorbell word (does it sleep?); the consumer
 *        spins on the commit word with `pause`, prefetching the record's
 *        next line while it waits, copies the payload out, and on its
 *        first empty poll publishes its head (a swap) and loads the
 *        producer's space word. Nobody parks: both words stay zero.
 *
 * It leaves out everything around the ring: mailbox routing, the receive's
 * other sources, error handling. Round-trip times come from rdtsc,
 * calibrated against CLOCK_MONOTONIC; each round reports its p50 and p99.
 */
#include "model.h"

#include <stdatomic.h>
#include <string.h>

enum { ROUND_TRIPS = 200000, ROUNDS = 10, LINE = 64, RING_BYTES = 256 << 10 };

struct line {
	_Alignas(LINE) _Atomic uint64_t word;
};

struct ring {
	_Alignas(LINE) unsigned char data[RING_BYTES];
	struct line head;      /* consumer's published head */
	struct line space;     /* producer parks here when full (never) */
	struct line doorbell;  /* receiver parks here (never) */
	_Alignas(LINE) uint64_t tail; /* producer's own line */
	_Alignas(LINE) uint64_t next; /* consumer's own line */
	uint64_t published;
};

static size_t payload = 64;
static int core[2] = {0, 1};
static struct ring *rings[2];
static struct line floor_word;
static uint64_t rtt[ROUND_TRIPS];

static size_t record_bytes(void)
{
	return (16 + payload + LINE - 1) & ~(size_t)(LINE - 1);
}

static void ring_send(struct ring *r, const unsigned char *msg)
{
	unsigned char *rec = r->data + (r->tail & (RING_BYTES - 1));
	/* A record never straddles the end: payloads here are small and the
	 * ring a multiple of the record size, as asserted in main. */
	memcpy(rec + 8, &(uint32_t){(uint32_t)payload}, 4);
	memcpy(rec + 12, &(uint32_t){0}, 4);
	memcpy(rec + 16, msg, payload);
	atomic_exchange_explicit((_Atomic uint64_t *)rec, r->tail + 1, memory_order_seq_cst);
	if (atomic_load_explicit(&r->doorbell.word, memory_order_seq_cst) != 0)
		abort(); /* a wake would go here */
	r->tail += record_bytes();
}

static void ring_recv(struct ring *r, unsigned char *out)
{
	unsigned char *rec = r->data + (r->next & (RING_BYTES - 1));
	_Atomic uint64_t *commit = (_Atomic uint64_t *)rec;
	while (atomic_load_explicit(commit, memory_order_acquire) != r->next + 1) {
		_mm_prefetch((const char *)(rec + LINE), _MM_HINT_T0);
		if (r->published != r->next) {
			r->published = r->next;
			atomic_exchange_explicit(&r->head.word, r->next, memory_order_seq_cst);
			if (atomic_load_explicit(&r->space.word, memory_order_seq_cst) != 0)
				abort(); /* a wake would go here */
		}
		_mm_pause();
	}
	uint32_t len;
	memcpy(&len, rec + 8, 4);
	memcpy(out, rec + 16, len);
	r->next += record_bytes();
}

static void floor_send(uint64_t v)
{
	atomic_store_explicit(&floor_word.word, v, memory_order_release);
}

static void floor_recv(uint64_t v)
{
	while (atomic_load_explicit(&floor_word.word, memory_order_acquire) != v)
		_mm_pause();
}

static int use_ring;

static void *echo(void *arg)
{
	(void)arg;
	unsigned char buf[4096];
	pin(core[1]);
	for (uint64_t i = 0; i < ROUND_TRIPS; i++) {
		if (use_ring) {
			ring_recv(rings[0], buf);
			ring_send(rings[1], buf);
		} else {
			floor_recv(2 * i + 1);
			floor_send(2 * i + 2);
		}
	}
	return NULL;
}

/* One round of the chosen variant: p50 and p99 in ns. */
static void round_of(int ring, double ticks_per_ns, double *p50, double *p99)
{
	unsigned char msg[4096], buf[4096];
	memset(msg, 7, sizeof msg);
	use_ring = ring;
	for (int k = 0; k < 2; k++) {
		memset(rings[k], 0, sizeof *rings[k]);
	}
	atomic_store(&floor_word.word, 0);
	pthread_t t;
	if (pthread_create(&t, NULL, echo, NULL)) {
		fprintf(stderr, "cannot start the echo thread\n");
		exit(1);
	}
	pin(core[0]);
	for (uint64_t i = 0; i < ROUND_TRIPS; i++) {
		uint64_t t0 = __rdtsc();
		if (ring) {
			ring_send(rings[0], msg);
			ring_recv(rings[1], buf);
		} else {
			floor_send(2 * i + 1);
			floor_recv(2 * i + 2);
		}
		rtt[i] = __rdtsc() - t0;
	}
	pthread_join(t, NULL);
	/* The first tenth warms caches and predictors. */
	uint64_t *s = rtt + ROUND_TRIPS / 10;
	size_t n = ROUND_TRIPS - ROUND_TRIPS / 10;
	qsort(s, n, sizeof *s, cmp_u64);
	*p50 = s[n / 2] / ticks_per_ns;
	*p99 = s[n * 99 / 100] / ticks_per_ns;
}

int main(int argc, char **argv)
{
	if (!parse_args(argc, argv, &payload, core) || payload > 4096 - 16 ||
	    RING_BYTES % record_bytes() != 0) {
		fprintf(stderr, "usage: ring_model [payload bytes: a record (16 + payload, "
				"rounded up to 64) must divide 256 KiB] [core a] [core b]\n");
		return 2;
	}
	for (int k = 0; k < 2; k++) {
		rings[k] = aligned_alloc(4096, sizeof(struct ring));
		if (!rings[k]) {
			fprintf(stderr, "out of memory\n");
			return 1;
		}
	}
	double f = calibrate();
	double floor50[ROUNDS / 2], ring50[ROUNDS / 2], ratio[ROUNDS / 2];
	double floor99 = 0, ring99 = 0;
	for (int r = 0; r < ROUNDS / 2; r++) {
		round_of(0, f, &floor50[r], &floor99);
		round_of(1, f, &ring50[r], &ring99);
		ratio[r] = ring50[r] / floor50[r];
	}
	qsort(floor50, ROUNDS / 2, sizeof(double), cmp_double);
	qsort(ring50, ROUNDS / 2, sizeof(double), cmp_double);
	qsort(ratio, ROUNDS / 2, sizeof(double), cmp_double);
	printf("ring model %zu B: p50 %.0f ns (p99 %.0f, last round); floor p50 %.0f ns (p99 %.0f); "
	       "ring / floor per round: median %.2f, range %.2f-%.2f\n",
	       payload, ring50[ROUNDS / 4], ring99, floor50[ROUNDS / 4], floor99, ratio[ROUNDS / 4],
	       ratio[0], ratio[ROUNDS / 2 - 1]);
	return 0;
}
