/* Work sharing for the CPU kernels: items [0, count) run on up to `threads` threads, this one included.
 *
 * Items are handed out a grain of work at a time (see MIN_GRAIN_BYTES) from a shared counter. The
 * calling thread works too and then waits only for grains already taken: a helper that the OS has
 * not yet run (other jobs on a 2-core machine) finds nothing left, so it costs the call nothing.
 *
 * Helpers are a pool started on first use and kept: a decoding step calls the kernels about a
 * hundred times in quick succession, and creating threads on every call cost more than many of
 * those calls take. Between jobs a helper spins for up to spin_nanoseconds (with `pause`; see
 * helpers_spin), then sleeps on a condition variable until the next job. After fork() the child starts a new pool on
 * its first parallel call (the parent's helpers do not exist there). This file is compiled once
 * into the extension, so the 4-bit and the dense kernels share one pool: their calls alternate
 * within a decoding step, and two pools would keep two sets of helpers spinning on the same cores.
 */
#include "kernels.h"

#include <stdint.h>
#include <stdlib.h>

#if !defined(_WIN32) && (defined(__GNUC__) || defined(__clang__))  /* pthreads and __atomic builtins */
#include <pthread.h>
#include <time.h>
#define HAVE_PTHREADS 1
#ifdef HAVE_X86_KERNELS
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif
#endif

/* Work a thread takes at a time: a sixteenth of a thread's share, within these bounds. Large
 * grains matter: a thread's software prefetch runs ahead within its grain only, so every grain
 * starts cold, and with grains of tens of KB two threads streamed a large matrix hardly faster
 * than one; with 1 MB grains they reach the memory's bandwidth. Small ones still balance
 * matrices of a few MB between threads. */
enum { MIN_GRAIN_BYTES = 32 * 1024, MAX_GRAIN_BYTES = 1024 * 1024, GRAINS_PER_THREAD = 16 };
enum { MAX_HELPERS = 255 };
/* How long a helper spins between jobs before it sleeps (waking a sleeping one costs as much as a
 * small product; README, "Int8 activations in small decoding steps"): by default briefly, so that
 * it does not take its core from torch's own multithreaded ops between kernel calls (a prefill);
 * while torch runs on one thread (helpers_spin, from kernels_own_the_cores: a decoding step)
 * longer than the gaps between a step's kernel calls (layer norms, attention, GELU). */
enum { SPIN_NANOSECONDS = 30000 };
static int64_t spin_nanoseconds = SPIN_NANOSECONDS;

typedef struct {
    RangeFunction run;
    const void *job;
    int64_t count, grain;
    int64_t next, done;  /* atomic: items handed out, items finished */
    int64_t refs;        /* atomic: threads (and the pool) still holding the queue; the last frees it */
    int64_t helpers;     /* helpers wanted; later ones leave it alone */
    int64_t joined;      /* atomic: helpers that took it */
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
    if (queue && fetch_add(&queue->refs, -1) == 1)
        free(queue);
}

#ifdef HAVE_PTHREADS
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int64_t generation;   /* atomic, written under lock: one more per job published */
    WorkQueue *queue;     /* under lock: the job helpers take now (the pool holds a reference) */
    int64_t started;      /* under lock: helpers running */
    int64_t sleepers;     /* under lock: helpers waiting on `wake` */
    int64_t atfork_registered;   /* under lock: pthread_atfork handler registered */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static int64_t monotonic_nanoseconds(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

static void *pool_helper(void *arg)
{
    int64_t seen = (int64_t)(intptr_t)arg;
    for (;;) {
        const int64_t spin_until = monotonic_nanoseconds() + load(&spin_nanoseconds);
        for (int i = 0; load(&pool.generation) == seen; i++) {
            cpu_relax();
            if ((i & 255) == 255 && monotonic_nanoseconds() > spin_until)
                break;
        }
        pthread_mutex_lock(&pool.lock);
        while (pool.generation == seen) {
            pool.sleepers++;
            pthread_cond_wait(&pool.wake, &pool.lock);
            pool.sleepers--;
        }
        seen = pool.generation;
        WorkQueue *queue = pool.queue;
        if (queue)
            fetch_add(&queue->refs, 1);
        pthread_mutex_unlock(&pool.lock);
        if (queue && fetch_add(&queue->joined, 1) < queue->helpers)
            work(queue);
        release(queue);
    }
    return NULL;
}

/* In a forked child only the forking thread exists: forget the parent's helpers. */
static void pool_after_fork(void)
{
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.queue = NULL;  /* its memory is the parent's copy: left, not freed */
    pool.started = pool.sleepers = 0;
}

/* Publishes `queue` to at least `helpers` pool threads (started as needed); 0 if none could be. */
static int pool_publish(WorkQueue *queue, int64_t helpers)
{
    pthread_mutex_lock(&pool.lock);
    if (!pool.atfork_registered)
        pool.atfork_registered = pthread_atfork(NULL, NULL, pool_after_fork) == 0;
    while (pool.started < helpers && pool.started < MAX_HELPERS) {
        pthread_t id;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&id, &attr, pool_helper, (void *)(intptr_t)pool.generation);
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        pool.started++;
    }
    WorkQueue *previous = NULL;
    if (pool.started) {
        fetch_add(&queue->refs, 1);
        previous = pool.queue;  /* another caller's, still published: it finishes on its own */
        pool.queue = queue;
        __atomic_store_n(&pool.generation, pool.generation + 1, __ATOMIC_RELEASE);
        if (pool.sleepers)
            pthread_cond_broadcast(&pool.wake);
    }
    const int published = pool.started > 0;
    pthread_mutex_unlock(&pool.lock);
    release(previous);
    return published;
}

static void pool_withdraw(WorkQueue *queue)
{
    pthread_mutex_lock(&pool.lock);
    const int held = pool.queue == queue;
    if (held)
        pool.queue = NULL;
    pthread_mutex_unlock(&pool.lock);
    if (held)
        release(queue);
}
#endif

/* See kernels.h. A helper that comes after the call returned finds the queue empty and never reads `job`. */
int64_t helpers_spin(int64_t nanoseconds)
{
#ifdef HAVE_PTHREADS
    return __atomic_exchange_n(&spin_nanoseconds, nanoseconds < 0 ? SPIN_NANOSECONDS : nanoseconds, __ATOMIC_ACQ_REL);
#else
    (void)nanoseconds;
    return 0;
#endif
}

int run_parallel(RangeFunction run, const void *job, int64_t count, int64_t bytes_per_item, int threads,
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
    *queue = (WorkQueue){.run = run, .job = job, .count = count, .grain = grain > 0 ? grain : 1, .refs = 1,
                         .helpers = helpers};
#ifdef HAVE_PTHREADS
    const int published = helpers > 0 && pool_publish(queue, helpers);
#endif
    work(queue);
#ifdef HAVE_PTHREADS
    if (published) {
        pool_withdraw(queue);  /* no new helper takes it now */
        while (load(&queue->done) < count)  /* only grains other threads are finishing */
            cpu_relax();
    }
#endif
    release(queue);
    return 0;
}
