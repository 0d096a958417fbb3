/* Work sharing for the CPU kernels: items [0, count) run on up to `threads` threads, this one included.
 *
 * Items are handed out a grain of work at a time (see MIN_GRAIN_BYTES) from a shared counter. The calling thread
 * works too and then waits only for grains already taken: a helper that the OS has not yet run
 * (other jobs on a 2-core machine) finds nothing left and quits later on its own, so it costs the
 * call nothing. Each item's result must not depend on which thread computes it. Threads are created
 * per call (tens of microseconds), which keeps the modules free of global state and safe across
 * fork(). Header-only (static functions): each extension module includes it once.
 */
#ifndef BLOOMCONV_PARALLEL_H
#define BLOOMCONV_PARALLEL_H

#include <stdint.h>
#include <stdlib.h>

#if !defined(_WIN32) && (defined(__GNUC__) || defined(__clang__))  /* pthreads and __atomic builtins */
#include <pthread.h>
#include <sched.h>
#define HAVE_PTHREADS 1
#endif

/* Work a thread takes at a time: a sixteenth of a thread's share, within these bounds. Large
 * grains matter: a thread's software prefetch runs ahead within its grain only, so every grain
 * starts cold; with 32 KB grains two threads streamed an int8 250880 x 1024 matrix at 26-28 GB/s
 * (one thread: 25-27), with 1 MB grains at 33-35 GB/s (torch.sum's bandwidth: 34-36). Small
 * ones still balance matrices of a few MB between threads. */
enum { MIN_GRAIN_BYTES = 32 * 1024, MAX_GRAIN_BYTES = 1024 * 1024, GRAINS_PER_THREAD = 16 };

/* Computes items [begin, end) of the job described by `job`. */
typedef void (*RangeFunction)(const void *job, int64_t begin, int64_t end);

typedef struct {
    RangeFunction run;
    const void *job;
    int64_t count, grain;
    int64_t next, done;  /* atomic: items handed out, items finished */
    int64_t refs;        /* atomic: threads still holding the queue; the last one frees it */
} WorkQueue;

#ifdef HAVE_PTHREADS
static int64_t fetch_add(int64_t *value, int64_t delta) { return __atomic_fetch_add(value, delta, __ATOMIC_ACQ_REL); }
static int64_t load(int64_t *value) { return __atomic_load_n(value, __ATOMIC_ACQUIRE); }
#else  /* one thread */
static int64_t fetch_add(int64_t *value, int64_t delta) { int64_t old = *value; *value += delta; return old; }
#endif

static void work(WorkQueue *queue)
{
    for (;;) {
        const int64_t begin = fetch_add(&queue->next, queue->grain);
        if (begin >= queue->count)
            return;
        const int64_t end = begin + queue->grain < queue->count ? begin + queue->grain : queue->count;
        queue->run(queue->job, begin, end);
        fetch_add(&queue->done, end - begin);
    }
}

static void release(WorkQueue *queue)
{
    if (fetch_add(&queue->refs, -1) == 1)
        free(queue);
}

#ifdef HAVE_PTHREADS
static void *helper(void *arg)
{
    work(arg);
    release(arg);
    return NULL;
}
#endif

/* Runs `run(job, ...)` over items [0, count) on up to `threads` threads, this one included, one
 * per `min_bytes_per_thread` of work (below that a thread costs more than it saves: creating it
 * takes tens of microseconds); -1 when out of memory. `job` must stay valid until the call
 * returns (helpers still alive then only find the queue empty). */
static int run_parallel(RangeFunction run, const void *job, int64_t count, int64_t bytes_per_item, int threads,
                        int64_t min_bytes_per_thread)
{
    bytes_per_item = bytes_per_item > 0 ? bytes_per_item : 1;
    int64_t helpers = count * bytes_per_item / min_bytes_per_thread - 1;  /* threads besides this one */
    helpers = helpers < threads - 1 ? helpers : threads - 1;
    helpers = helpers > 0 ? helpers : 0;
    int64_t grain_bytes = count * bytes_per_item / ((helpers + 1) * GRAINS_PER_THREAD);
    grain_bytes = grain_bytes < MIN_GRAIN_BYTES ? MIN_GRAIN_BYTES : grain_bytes > MAX_GRAIN_BYTES ? MAX_GRAIN_BYTES : grain_bytes;
    const int64_t grain = grain_bytes / bytes_per_item;
    WorkQueue *queue = malloc(sizeof *queue);
    if (!queue)
        return -1;
    *queue = (WorkQueue){.run = run, .job = job, .count = count, .grain = grain > 0 ? grain : 1, .refs = 1};
#ifdef HAVE_PTHREADS
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int64_t i = 0; i < helpers; i++) {
        pthread_t id;
        fetch_add(&queue->refs, 1);
        if (pthread_create(&id, &attr, helper, queue) != 0) {
            fetch_add(&queue->refs, -1);
            break;
        }
    }
    pthread_attr_destroy(&attr);
#else
    (void)helpers;
#endif
    work(queue);
#ifdef HAVE_PTHREADS
    while (load(&queue->done) < count)  /* only grains other threads are finishing */
        sched_yield();
#endif
    release(queue);
    return 0;
}

#endif
