/*
 * What the C models in this directory share: pinning a thread to a core,
 * comparisons for qsort, the rdtsc rate and their arguments.
 */
#ifndef NEFELE_PERF_MODEL_H
#define NEFELE_PERF_MODEL_H

#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <x86intrin.h>

/* Pins the calling thread to core `c`, or exits. */
static inline void pin(int c)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(c, &set);
	if (pthread_setaffinity_np(pthread_self(), sizeof set, &set)) {
		fprintf(stderr, "cannot pin to core %d\n", c);
		exit(1);
	}
}

static inline int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static inline int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* rdtsc ticks per nanosecond, against CLOCK_MONOTONIC over 0.2 s. */
static inline double calibrate(void)
{
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	uint64_t t0 = __rdtsc();
	do
		clock_gettime(CLOCK_MONOTONIC, &b);
	while ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec) < 2e8);
	uint64_t t1 = __rdtsc();
	return (t1 - t0) / ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec));
}

/* Reads the models' arguments, `[payload bytes] [core a] [core b]`, into
 * what was given; 0 if they are malformed. */
static inline int parse_args(int argc, char **argv, size_t *payload, int core[2])
{
	char *end = NULL;
	if (argc > 1)
		*payload = strtoul(argv[1], &end, 10);
	if (argc > 3) {
		core[0] = atoi(argv[2]);
		core[1] = atoi(argv[3]);
	}
	return !(argc == 3 || argc > 4 || (end && (*end || end == argv[1])));
}

#endif
