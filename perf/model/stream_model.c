/*
 * A one-way stream through a ring: why fabric rings pack their records
 * and why a consumer that drained a burst holds off the ring for a while.
 *
 * A producer thread streams BLOCK messages through a 256 KiB ring to a
 * consumer thread on another core, as fabric::ring does for a reliable
 * message: the record is a 16-byte header (commit word, length) and the
 * payload; the producer copies the payload in and publishes the record by
 * swapping its stamp into the commit word (xchg, a full barrier), then
 * loads the receiver's doorbell word; the consumer spins on the commit
 * word of the record at its head (with `pause`), copies the payload out,
 * publishes its head (a swap, then a load of the producer's space word)
 * when it finds the ring empty and every eighth of the ring otherwise.
 * Four ways, switching every block so that all four see the same machine
 * state (these hosts change speed within seconds):
 *   line      - records aligned to cache lines (a 64-byte message takes
 *               two lines), the consumer polls again at once;
 *   line+hold - the same, but a consumer that found the ring empty after
 *               taking records waits HOLD pauses before it looks again;
 *   packed    - records aligned to 16 bytes (a 64-byte message takes 80
 *               bytes), polls again at once;
 *   packed+hold - both;
 *   +evict    - packed+hold, and the consumer evicts (clflushopt) the lines
 *               it has wholly read when the hold begins and when it
 *               publishes its head within a burst (what fabric::ring does,
 *               its hold counted in polls rather than pauses).
 * Before each block the threads bounce one cache line FLOOR_TRIPS times:
 * that round trip (the floor) tells which phase the host was in. Each
 * row prints the floor and every way's rate in millions of messages per
 * second.
 *
 *   cc -O2 -pthread -o /tmp/stream_model perf/model/stream_model.c
 * (the +evict way needs a processor with clflushopt)
 *   /tmp/stream_model [payload bytes, 1-4080] [core a] [core b]
 */
#include "model.h"

#include <stdatomic.h>
#include <string.h>

enum { LINE = 64, RING_BYTES = 256 << 10, BLOCK = 400000, ROWS = 8 };
enum { FLOOR_TRIPS = 2000, HOLD = 48, WAYS = 5, MAX_PAYLOAD = 4080 };

static const char *way_name[WAYS] = {"line", "line+hold", "packed", "packed+hold", "+evict"};
static const size_t way_align[WAYS] = {LINE, LINE, 16, 16, 16};
static const int way_hold[WAYS] = {0, HOLD, 0, HOLD, HOLD};
static const int way_evict[WAYS] = {0, 0, 0, 0, 1};

struct line {
	_Alignas(LINE) _Atomic uint64_t word;
};

static _Alignas(LINE) unsigned char data[RING_BYTES];
static struct line head;     /* consumer's published head */
static struct line space;    /* producer would park here (never) */
static struct line doorbell; /* consumer would park here (never) */
static struct line go;       /* block number the producer started */
static struct line done;     /* block number the consumer finished */
static struct line bounce;   /* the floor's line */

static const uint64_t key = 0x8badf00d12345678ull;
static size_t payload = 64;
static int core[2] = {0, 1};
static int way; /* written before `go`, read after it */

static size_t record_bytes(void)
{
	size_t align = way_align[way];
	return (16 + payload + align - 1) & ~(align - 1);
}

static _Atomic uint64_t *commit_word(uint64_t pos)
{
	return (_Atomic uint64_t *)(data + (pos & (RING_BYTES - 1)));
}

/* Evicts the lines wholly inside [from, to) from every cache. */
__attribute__((target("clflushopt"))) static void evict(uint64_t from, uint64_t to)
{
	for (uint64_t at = (from + LINE - 1) & ~(uint64_t)(LINE - 1); at + LINE <= to; at += LINE)
		_mm_clflushopt(data + (at & (RING_BYTES - 1)));
}

static void publish_head(uint64_t h, uint64_t *published)
{
	*published = h;
	atomic_exchange(&head.word, h);
	(void)atomic_load(&space.word);
}

static void *consumer(void *arg)
{
	(void)arg;
	pin(core[1]);
	static unsigned char out[MAX_PAYLOAD];
	uint64_t h = 0, published = 0, evicted = 0;
	for (uint64_t block = 1; block <= ROWS * WAYS; block++) {
		while (atomic_load(&go.word) != block)
			_mm_pause();
		for (uint64_t i = 1; i <= FLOOR_TRIPS; i++) {
			while (atomic_load_explicit(&bounce.word, memory_order_acquire) != 2 * i - 1)
				_mm_pause();
			atomic_store_explicit(&bounce.word, 2 * i, memory_order_release);
		}
		/* Every block starts on a line, as the producer's does. */
		h = (h + LINE - 1) & ~(uint64_t)(LINE - 1);
		evicted = h;
		int took = 0;
		for (int n = 0; n < BLOCK;) {
			unsigned char *r = data + (h & (RING_BYTES - 1));
			if (atomic_load_explicit(commit_word(h), memory_order_acquire) == ((h + 1) ^ key)) {
				uint32_t len;
				memcpy(&len, r + 8, sizeof len);
				memcpy(out, r + 16, len);
				h += record_bytes();
				n++;
				took++;
				if (h - published >= RING_BYTES / 8) {
					if (way_evict[way])
						evict(evicted, h);
					evicted = h;
					publish_head(h, &published);
				}
				continue;
			}
			if (took >= 2 && way_evict[way])
				evict(evicted, h);
			evicted = h;
			if (published != h)
				publish_head(h, &published);
			_mm_prefetch((const char *)data + ((h + LINE) & (RING_BYTES - 1)), _MM_HINT_T0);
			if (took >= 2)
				for (int k = 0; k < way_hold[way]; k++)
					_mm_pause();
			took = 0;
			_mm_pause();
		}
		atomic_store(&done.word, block);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (!parse_args(argc, argv, &payload, core) || payload < 1 || payload > MAX_PAYLOAD) {
		fprintf(stderr, "usage: %s [payload bytes, 1-%d] [core a] [core b]\n", argv[0],
			MAX_PAYLOAD);
		return 2;
	}
	pthread_t t;
	if (pthread_create(&t, NULL, consumer, NULL)) {
		fprintf(stderr, "cannot start the consumer thread\n");
		return 1;
	}
	pin(core[0]);
	double ticks_per_ns = calibrate();
	static unsigned char msg[MAX_PAYLOAD];
	memset(msg, 0xa5, sizeof msg);
	uint64_t tail = 0, head_cache = 0, block = 0;
	double floor_ns[ROWS], rate[ROWS][WAYS];
	printf("payload %zu bytes, cores %d and %d, %d messages a block\n", payload, core[0],
	       core[1], BLOCK);
	for (int row = 0; row < ROWS; row++) {
		for (int w = 0; w < WAYS; w++) {
			way = w;
			atomic_store(&bounce.word, 0);
			atomic_store(&go.word, ++block);
			uint64_t t0 = __rdtsc();
			for (uint64_t i = 1; i <= FLOOR_TRIPS; i++) {
				atomic_store_explicit(&bounce.word, 2 * i - 1, memory_order_release);
				while (atomic_load_explicit(&bounce.word, memory_order_acquire) != 2 * i)
					_mm_pause();
			}
			if (w == 0)
				floor_ns[row] = (__rdtsc() - t0) / ticks_per_ns / FLOOR_TRIPS;
			tail = (tail + LINE - 1) & ~(uint64_t)(LINE - 1);
			t0 = __rdtsc();
			for (int n = 0; n < BLOCK; n++) {
				size_t size = record_bytes();
				while (tail + size - head_cache > RING_BYTES) {
					head_cache = atomic_load(&head.word);
					if (tail + size - head_cache > RING_BYTES)
						_mm_pause();
				}
				unsigned char *r = data + (tail & (RING_BYTES - 1));
				uint32_t len = payload;
				memcpy(r + 8, &len, sizeof len);
				memcpy(r + 16, msg, payload);
				atomic_exchange(commit_word(tail), (tail + 1) ^ key);
				(void)atomic_load(&doorbell.word);
				tail += size;
			}
			while (atomic_load(&done.word) != block)
				_mm_pause();
			rate[row][w] = BLOCK / ((__rdtsc() - t0) / ticks_per_ns) * 1e3;
		}
	}
	pthread_join(t, NULL);
	printf("%8s", "floor ns");
	for (int w = 0; w < WAYS; w++)
		printf("  %11s", way_name[w]);
	printf("   (M msg/s)\n");
	for (int row = 0; row < ROWS; row++) {
		printf("%8.0f", floor_ns[row]);
		for (int w = 0; w < WAYS; w++)
			printf("  %11.1f", rate[row][w]);
		printf("\n");
	}
	return 0;
}
