/* A small thread pool for the kernels: pool_run(fn, arg) runs fn(arg, t, threads) on every thread t (the caller is
 * thread 0) and returns when all are done.
 *
 * Why not OpenMP: torch's wheels bring their own libgomp, and a second OpenMP runtime in the process would keep a
 * second set of spinning threads. Why spinning at all: a decoding step makes ~100 kernel calls tens of
 * microseconds apart; a worker that slept after each would take a futex wake-up (~50 us) per call. Workers spin a
 * bounded while after a job, then sleep on a condition variable.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "native.h"

#if defined(MTP_X86)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#define MAX_THREADS 256
#define SPIN_ROUNDS 200000  /* pause instructions a worker spins for the next job before it sleeps */

static int wanted_threads = 1;
static int started_workers = 0;  /* workers alive: threads 1 .. started_workers */
static pthread_t workers[MAX_THREADS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t all_done = PTHREAD_COND_INITIALIZER;
static atomic_uint generation;   /* bumped for each job, under `lock` */
static atomic_int unfinished;    /* workers still running the current job */
static int sleepers;             /* workers waiting on `wake`, under `lock` */
static int job_threads;
static PoolFn job_fn;
static void *job_arg;
/* One job at a time: callers on several Python threads queue here. */
static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER;

/* The generation current when each worker was started: its first job is the next one (reading `generation` in
 * the new thread instead could already see that job's number and miss it). */
static unsigned born_at[MAX_THREADS];

static void *worker_main(void *index) {
    int thread = (int)(intptr_t)index;
    unsigned seen = born_at[thread];
    for (;;) {
        unsigned now = seen;
        for (int spin = 0; spin < SPIN_ROUNDS && (now = atomic_load_explicit(&generation, memory_order_acquire))
             == seen; spin++) {
            CPU_RELAX();
        }
        if (now == seen) {
            pthread_mutex_lock(&lock);
            sleepers++;
            while ((now = atomic_load(&generation)) == seen) pthread_cond_wait(&wake, &lock);
            sleepers--;
            pthread_mutex_unlock(&lock);
        }
        seen = now;
        if (thread < job_threads) job_fn(job_arg, thread, job_threads);
        if (atomic_fetch_sub_explicit(&unfinished, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&lock);
            pthread_cond_signal(&all_done);
            pthread_mutex_unlock(&lock);
        }
    }
    return NULL;
}

/* A forked child has no workers (only the forking thread survives a fork): start them again when needed. */
static void forget_workers(void) {
    started_workers = 0;
    pthread_mutex_init(&lock, NULL);
    pthread_mutex_init(&run_lock, NULL);
    pthread_cond_init(&wake, NULL);
    pthread_cond_init(&all_done, NULL);
    sleepers = 0;
}

static void start_workers(int threads) {
    static int fork_handler_set = 0;
    if (!fork_handler_set) {
        pthread_atfork(NULL, NULL, forget_workers);
        fork_handler_set = 1;
    }
    while (started_workers < threads - 1) {
        int index = started_workers + 1;
        born_at[index] = atomic_load(&generation);
        if (pthread_create(&workers[index], NULL, worker_main, (void *)(intptr_t)index) != 0) break;
        pthread_detach(workers[index]);
        started_workers++;
    }
}

int pool_threads(void) { return wanted_threads; }

void pool_set_threads(int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    pthread_mutex_lock(&run_lock);
    wanted_threads = threads;
    pthread_mutex_unlock(&run_lock);
}

void pool_run(PoolFn fn, void *arg) {
    pthread_mutex_lock(&run_lock);
    start_workers(wanted_threads);
    int threads = started_workers + 1 < wanted_threads ? started_workers + 1 : wanted_threads;
    if (threads == 1 || started_workers == 0) {
        fn(arg, 0, 1);
        pthread_mutex_unlock(&run_lock);
        return;
    }
    /* Every started worker takes part in the generation count (a surplus one runs nothing), so none is left
     * behind a generation when the thread count shrinks. */
    job_fn = fn;
    job_arg = arg;
    job_threads = threads;
    atomic_store(&unfinished, started_workers);
    pthread_mutex_lock(&lock);
    atomic_fetch_add_explicit(&generation, 1, memory_order_release);
    if (sleepers) pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    fn(arg, 0, threads);
    for (int spin = 0; spin < SPIN_ROUNDS && atomic_load_explicit(&unfinished, memory_order_acquire); spin++) {
        CPU_RELAX();
    }
    if (atomic_load(&unfinished)) {
        pthread_mutex_lock(&lock);
        while (atomic_load(&unfinished)) pthread_cond_wait(&all_done, &lock);
        pthread_mutex_unlock(&lock);
    }
    pthread_mutex_unlock(&run_lock);
}
