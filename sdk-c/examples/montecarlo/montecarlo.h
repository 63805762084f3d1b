/* The seed's Monte Carlo estimate of pi: messages between its programs. */
#ifndef MONTECARLO_H
#define MONTECARLO_H

#include <stdint.h>

#define PRINTER_ADDR "printer@{8080,1,1}"
#define MAIN_ADDR "main@{8081,1,1}"

/* A worker's count, sent to the printer; also the printer's answer to a query. */
struct count {
    uint64_t inside;
    uint64_t total;
};

/* main -> printer: answer with the sums once `results` counts have arrived. */
struct query {
    uint64_t magic; /* QUERY_MAGIC */
    uint64_t results;
    uint64_t reserved;
};
#define QUERY_MAGIC 0x59524555514e4d43ULL

#endif
