/* telemetry.eta._live: the live ETA estimator's two hot paths, and the scoring of a completed
 * job's ETAs, in C.
 *
 * step_ended(live, total_steps, duration_s, expert, ts) is LiveJob.step_ended(...) and
 * estimate_fields(live, now) is LiveJob.estimate_fields(now) (telemetry/eta/live.py, the
 * rule); score_issued(issued, end_ts) is telemetry.projections.eta.score_issued (each ETA's
 * error, coverage and misses, grouped by progress bucket), falling back to it for anything but
 * a list of EtaPoints with int times and float fields; corrected(prior, learned, steps, tau)
 * is telemetry.eta.live.corrected and learn(learned, observations, warmup_key, warmup_ratio)
 * telemetry.eta.online.learn: what online learning does when a job starts and when it ends;
 * add_all(histogram, errors, covered) is telemetry.projections.eta.Histogram.add_all; and
 * issue(running, ts) is telemetry.projections.eta._issue with this module's estimate_fields. The estimator's twins follow their rule
 * operation for operation: the same field writes, the memoised intermediate results
 * (speed_key/speed_cache, evidence_key/evidence, ahead_key/ahead) written as the Python writes
 * them, floats bit-identical (same order of operations, the same libm calls, compiled with
 * -ffp-contract=off so no fused multiply-add changes a rounding; CPython's errors for exp, log,
 * sqrt, log1p, erfc, ** and / reproduced by falling back). Anything unexpected — not a LiveJob,
 * a field of another type, a phase missing from a dictionary, a result Python would raise on —
 * makes the call fall back to the Python method, which gives the Python's result or raises
 * its exception. Every write the C makes before such a fallback is one the Python makes too,
 * with the same value. A contract test holds the two to identical ETAs and identical states.
 *
 * Constants (PRIOR_STEPS, Z90, SPEED_PHASES, the buckets...) are read from the Python modules
 * when this one is imported: they have one definition, there.
 *
 * Why C: issuing ETAs and observing steps were ~60 % of the ETA fold's time in `wantel replay`
 * (float objects, ** and the field reads of a dozen small methods per ETA); once they were C,
 * scoring the ETAs at completion was the fold's next cost (a loop of float arithmetic, dict
 * lookups and appends per ETA; ~5.5 µs a job in Python, ~0.5 µs here); then online learning
 * (a dozen small functions over dicts of lists of floats at each start and end: ~15 µs a job
 * in Python, a quarter of the fold; serve's set replays 1.11× faster with it in C).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>

/* -- what is read once, at import ------------------------------------------------------------ */

static PyTypeObject *LiveJob_Type;
static PyObject *speed_phases; /* frozenset */
static PyObject *buckets;      /* tuple of str */
static double bucket_edges[8];
static Py_ssize_t n_bucket_edges;
static PyObject *str_denoise, *str_step_ended, *str_estimate_fields;

static double PRIOR_STEPS, WARMUP_WEIGHT, Z90, MIN_SPEED_PHASE_S, PHASE_TIME_NOISE, STEP_NOISE,
    SPEED_HUBER, SURPRISE, RATIO_LIMIT, PRIOR_PIECES, PIECE_PRIOR_VARIANCE;
static long SPEED_ROUNDS;

#define FIELDS(X)                                                                              \
    X(start_ts) X(phases) X(expected) X(sigma) X(step_prior) X(warmup) X(speed_tau)            \
    X(speed_weight) X(step_variance) X(offsets) X(done) X(phase) X(phase_start_ts)             \
    X(total_steps) X(steps_done) X(first_step_s) X(later_sum) X(expert) X(segment_sum)         \
    X(segment_n) X(segment_prior) X(segment_observed) X(steps_seen) X(last_step_ts)            \
    X(last_remaining) X(last_ts) X(last_band) X(last_progress) X(speed_key) X(speed_cache)     \
    X(ahead_key) X(evidence_key) X(evidence) X(ahead) X(pieces_total) X(pieces_done)          \
    X(piece_units) X(piece_seconds) X(last_piece_ts) X(first_piece)

#define DECLARE(name) static Py_ssize_t off_##name;
FIELDS(DECLARE)
#undef DECLARE

#define SLOT(o, name) (*(PyObject **)((char *)(o) + off_##name))

/* The status of a computation: done, or "let the Python do this call" (FALLBACK, no Python
 * error set), or a real error (ERROR: a Python error is set, e.g. no memory). */
enum { OK = 0, FALLBACK = 1, ERROR = -1 };

/* -- reading and writing fields -------------------------------------------------------------- */

static inline int
read_float(PyObject *v, double *out)
{
    if (v == NULL || !PyFloat_CheckExact(v)) {
        return FALLBACK;
    }
    *out = PyFloat_AS_DOUBLE(v);
    return OK;
}

/* An int that fits in ±2**62 (so that a difference or a key of two never overflows). */
static inline int
read_int(PyObject *v, int64_t *out)
{
    if (v == NULL || !PyLong_CheckExact(v)) {
        return FALLBACK;
    }
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || (x == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return FALLBACK;
    }
    if (x > ((int64_t)1 << 62) || x < -((int64_t)1 << 62)) {
        return FALLBACK;
    }
    *out = (int64_t)x;
    return OK;
}

/* True or False (the bool fields). */
static inline int
read_bool(PyObject *v, int *out)
{
    if (v == Py_True) {
        *out = 1;
        return OK;
    }
    if (v == Py_False) {
        *out = 0;
        return OK;
    }
    return FALLBACK;
}

/* Write a field, taking the reference to ``value``; a GC-tracked value makes the LiveJob
 * tracked, as msgspec's setattr does. */
static inline void
write_slot(PyObject *o, Py_ssize_t offset, PyObject *value)
{
    PyObject **slot = (PyObject **)((char *)o + offset);
    PyObject *old = *slot;
    *slot = value;
    if (PyObject_IS_GC(value) && !PyObject_GC_IsTracked(o)) {
        PyObject_GC_Track(o);
    }
    Py_XDECREF(old);
}

static inline int
write_float(PyObject *o, Py_ssize_t offset, double x)
{
    PyObject *v = PyFloat_FromDouble(x);
    if (v == NULL) {
        return ERROR;
    }
    write_slot(o, offset, v);
    return OK;
}

static inline int
write_int(PyObject *o, Py_ssize_t offset, int64_t x)
{
    PyObject *v = PyLong_FromLongLong(x);
    if (v == NULL) {
        return ERROR;
    }
    write_slot(o, offset, v);
    return OK;
}

/* A memoised result: its key (an int) and its tuple of ``count`` values (``items``, new
 * references, any of them NULL if making it failed), written key first as the Python writes
 * them. Takes the references to the items. */
static int
write_memo(PyObject *o, Py_ssize_t key_offset, int64_t key, Py_ssize_t value_offset,
           Py_ssize_t count, PyObject **items)
{
    PyObject *value = NULL;
    int made = 1;
    for (Py_ssize_t i = 0; i < count; i++) {
        made = made && items[i] != NULL;
    }
    if (made) {
        value = PyTuple_New(count);
        if (value != NULL) {
            for (Py_ssize_t i = 0; i < count; i++) {
                PyTuple_SET_ITEM(value, i, items[i]); /* steals */
            }
        }
    }
    if (value == NULL) { /* the items were not stolen */
        for (Py_ssize_t i = 0; i < count; i++) {
            Py_XDECREF(items[i]);
        }
        return ERROR;
    }
    PyObject *key_obj = PyLong_FromLongLong(key);
    if (key_obj == NULL) {
        Py_DECREF(value);
        return ERROR;
    }
    write_slot(o, key_offset, key_obj);
    write_slot(o, value_offset, value);
    return OK;
}

/* -- CPython's arithmetic, errors included ---------------------------------------------------- */

#define CHECK(call)                                                                            \
    do {                                                                                       \
        int status_ = (call);                                                                  \
        if (status_ != OK) {                                                                   \
            return status_;                                                                    \
        }                                                                                      \
    } while (0)

/* a / b, where Python raises ZeroDivisionError for b == 0. */
#define DIV(out, a, b)                                                                         \
    do {                                                                                       \
        double b_ = (b);                                                                       \
        if (b_ == 0.0) {                                                                       \
            return FALLBACK;                                                                   \
        }                                                                                      \
        (out) = (a) / b_;                                                                      \
    } while (0)

/* math.exp, math.sqrt, math.log1p, math.erfc: CPython's math_1 (its errors: a NaN from a
 * number, an infinity from a finite number, errno). */
static inline int
math_1(double (*f)(double), double x, double *out)
{
    errno = 0;
    double r = f(x);
    if (isnan(r) && !isnan(x)) {
        return FALLBACK;
    }
    if (isinf(r) && isfinite(x)) {
        return FALLBACK;
    }
    if (isfinite(r) && errno != 0) {
        if (errno == EDOM || fabs(r) >= 1.5) {
            return FALLBACK;
        }
    }
    *out = r;
    return OK;
}

/* math.log of a float (CPython's m_log: 0 and negatives are errors). */
static inline int
math_log(double x, double *out)
{
    if (isfinite(x)) {
        if (x > 0.0) {
            *out = log(x);
            return OK;
        }
        return FALLBACK;
    }
    if (isnan(x) || x > 0.0) {
        *out = x;
        return OK;
    }
    return FALLBACK;
}

/* libm's pow, called: GCC turns pow(x, 2.0) into x * x, which is correctly rounded where
 * glibc's pow (what CPython's float_pow calls) is not always; they differ in ~1 case in 1,000. */
static double (*volatile libm_pow)(double, double) = pow;

/* x ** 2 for a float x (CPython's float_pow: libm pow, an overflow is an error). */
static inline int
square(double x, double *out)
{
    if (isnan(x) || isinf(x)) {
        *out = isnan(x) ? x : INFINITY;
        return OK;
    }
    if (x == 1.0) {
        *out = 1.0;
        return OK;
    }
    if (x == 0.0) {
        *out = 0.0;
        return OK;
    }
    errno = 0;
    double r = libm_pow(x < 0.0 ? -x : x, 2.0);
    if (errno == 0 && isinf(r)) {
        errno = ERANGE;
    }
    else if (errno == ERANGE && r == 0.0) {
        errno = 0;
    }
    if (errno != 0) {
        return FALLBACK;
    }
    *out = r;
    return OK;
}

/* (a - b) / 1e9 for two int nanosecond times: int64 difference, converted as CPython converts
 * an int to a float (round half to even), then divided. */
static inline int
seconds_between(PyObject *a, PyObject *b, double *out)
{
    int64_t x, y;
    CHECK(read_int(a, &x));
    CHECK(read_int(b, &y));
    *out = (double)(x - y) / 1e9;
    return OK;
}

/* -- the estimator ---------------------------------------------------------------------------- */

typedef struct {
    PyObject *live;
    PyObject *phases, *expected, *sigma, *done;
    double step_prior, speed_tau, speed_weight, step_variance, warmup;
    double later_sum, segment_sum, segment_n, segment_prior;
    int segment_observed;
    int64_t steps_seen, steps_done, total_steps;
} Job;

/* The fields every computation reads, checked. */
static int
load(PyObject *live, Job *job)
{
    job->live = live;
    job->phases = SLOT(live, phases);
    job->expected = SLOT(live, expected);
    job->sigma = SLOT(live, sigma);
    job->done = SLOT(live, done);
    if (job->phases == NULL || !PyTuple_CheckExact(job->phases) || job->expected == NULL ||
        !PyDict_CheckExact(job->expected) || job->sigma == NULL ||
        !PyDict_CheckExact(job->sigma) || job->done == NULL || !PyDict_CheckExact(job->done)) {
        return FALLBACK;
    }
    CHECK(read_float(SLOT(live, step_prior), &job->step_prior));
    CHECK(read_float(SLOT(live, speed_tau), &job->speed_tau));
    CHECK(read_float(SLOT(live, speed_weight), &job->speed_weight));
    CHECK(read_float(SLOT(live, step_variance), &job->step_variance));
    CHECK(read_float(SLOT(live, warmup), &job->warmup));
    CHECK(read_float(SLOT(live, later_sum), &job->later_sum));
    CHECK(read_float(SLOT(live, segment_sum), &job->segment_sum));
    CHECK(read_float(SLOT(live, segment_n), &job->segment_n));
    CHECK(read_float(SLOT(live, segment_prior), &job->segment_prior));
    CHECK(read_bool(SLOT(live, segment_observed), &job->segment_observed));
    CHECK(read_int(SLOT(live, steps_seen), &job->steps_seen));
    CHECK(read_int(SLOT(live, steps_done), &job->steps_done));
    CHECK(read_int(SLOT(live, total_steps), &job->total_steps));
    return OK;
}

static inline double
clamp_ratio(double ratio)
{
    return ratio < -RATIO_LIMIT ? -RATIO_LIMIT : (ratio > RATIO_LIMIT ? RATIO_LIMIT : ratio);
}

static inline double
own_variance(double sigma, double shared)
{
    double total = sigma * sigma;
    double own = total - shared;
    double floor_ = total > 2e-4 ? 0.5 * total : 1e-4;
    return own > floor_ ? own : floor_;
}

static inline double
excess_of(double mean, double shared)
{
    double excess = mean * mean - shared;
    return excess > 0.0 ? excess : 0.0;
}

static inline double
surprise(double mean, double shared)
{
    return SURPRISE * excess_of(mean, shared);
}

/* prior_pieces(speed, tau): the pieces the prior's pace weighs. */
static inline double
prior_pieces(double speed, double tau)
{
    double mean = speed > 0.0 ? log(speed) : 0.0;
    return PRIOR_PIECES / (1.0 + excess_of(mean, tau * tau) / PIECE_PRIOR_VARIANCE);
}

/* dict.get(key, default) for a dictionary of floats. */
static inline int
get_float(PyObject *dict, PyObject *key, double fallback_value, double *out)
{
    PyObject *v = PyDict_GetItemWithError(dict, key);
    if (v == NULL) {
        if (PyErr_Occurred()) {
            PyErr_Clear();
            return FALLBACK;
        }
        *out = fallback_value;
        return OK;
    }
    return read_float(v, out);
}

/* dict[key] for a dictionary of floats (a missing key: Python's KeyError, by falling back). */
static inline int
item_float(PyObject *dict, PyObject *key, double *out)
{
    PyObject *v = PyDict_GetItemWithError(dict, key);
    if (v == NULL) {
        PyErr_Clear();
        return FALLBACK;
    }
    return read_float(v, out);
}

/* A list of floats as a C array (at most `cap`). */
static int
floats_of(PyObject *list, double *out, Py_ssize_t cap, Py_ssize_t *n)
{
    if (!PyList_CheckExact(list)) {
        return FALLBACK;
    }
    Py_ssize_t size = PyList_GET_SIZE(list);
    if (size > cap) {
        return FALLBACK;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        CHECK(read_float(PyList_GET_ITEM(list, i), &out[i]));
    }
    *n = size;
    return OK;
}

#define MAX_EVIDENCE 64

static PyObject *
list_of(const double *values, Py_ssize_t n)
{
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyFloat_FromDouble(values[i]);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

/* LiveJob._phase_evidence(shared): the finished phases' log ratios and weights, memoised. */
static int
phase_evidence(Job *job, double shared, double *ratios, double *weights, Py_ssize_t *n)
{
    Py_ssize_t pos = 0, count = 0;
    PyObject *phase, *value;
    while (PyDict_Next(job->done, &pos, &phase, &value)) {
        double seconds, expected, sigma, ratio, quotient;
        int in = PySet_Contains(speed_phases, phase);
        if (in < 0) {
            PyErr_Clear();
            return FALLBACK;
        }
        if (!in) {
            continue;
        }
        CHECK(read_float(value, &seconds));
        if (seconds <= 0) {
            continue;
        }
        CHECK(get_float(job->expected, phase, 0.0, &expected));
        if (expected < MIN_SPEED_PHASE_S) {
            continue;
        }
        if (count == MAX_EVIDENCE) {
            return FALLBACK;
        }
        DIV(quotient, seconds, expected);
        CHECK(math_log(quotient, &ratio));
        ratios[count] = clamp_ratio(ratio);
        CHECK(get_float(job->sigma, phase, 0.35, &sigma));
        DIV(quotient, PHASE_TIME_NOISE, seconds);
        DIV(weights[count], 1.0, own_variance(sigma, shared) + quotient * quotient);
        count++;
    }
    /* self.evidence_key, self.evidence = len(self.done), (ratios, weights) */
    PyObject *pair[2] = {list_of(ratios, count), list_of(weights, count)};
    CHECK(write_memo(job->live, off_evidence_key, PyDict_GET_SIZE(job->done), off_evidence, 2,
                     pair));
    *n = count;
    return OK;
}

/* Whether a memo's key field holds the int `key` (*match); FALLBACK if it holds anything but
 * an int (a float equal to the key would match in Python). */
static inline int
key_matches(PyObject *v, int64_t key, int *match)
{
    int64_t x;
    if (v == NULL || !PyLong_CheckExact(v)) {
        return FALLBACK;
    }
    *match = read_int(v, &x) == OK && x == key; /* beyond ±2**62: not a key */
    return OK;
}

/* LiveJob._speed_and_variance(): the job's speed factor and the variance of its log. */
static int
speed_and_variance(Job *job, double *speed, double *speed_var)
{
    PyObject *live = job->live;
    if (job->steps_seen > ((int64_t)1 << 50) || job->steps_seen < -((int64_t)1 << 50)) {
        return FALLBACK;
    }
    int64_t key = job->steps_seen * 64 + PyDict_GET_SIZE(job->done);
    int match;
    CHECK(key_matches(SLOT(live, speed_key), key, &match));
    if (match) {
        PyObject *cache = SLOT(live, speed_cache);
        if (cache == NULL || !PyTuple_CheckExact(cache) || PyTuple_GET_SIZE(cache) != 2) {
            return FALLBACK;
        }
        CHECK(read_float(PyTuple_GET_ITEM(cache, 0), speed));
        CHECK(read_float(PyTuple_GET_ITEM(cache, 1), speed_var));
        return OK;
    }
    double tau = job->speed_tau;
    double shared = tau * tau;
    double prior_weight = job->speed_weight;
    double ratios[MAX_EVIDENCE + 1], weights[MAX_EVIDENCE + 1];
    Py_ssize_t n = 0;
    CHECK(key_matches(SLOT(live, evidence_key), PyDict_GET_SIZE(job->done), &match));
    if (match) {
        PyObject *evidence = SLOT(live, evidence);
        Py_ssize_t n_weights = 0;
        if (evidence == NULL || !PyTuple_CheckExact(evidence) ||
            PyTuple_GET_SIZE(evidence) != 2) {
            return FALLBACK;
        }
        CHECK(floats_of(PyTuple_GET_ITEM(evidence, 0), ratios, MAX_EVIDENCE, &n));
        CHECK(floats_of(PyTuple_GET_ITEM(evidence, 1), weights, MAX_EVIDENCE, &n_weights));
        if (n != n_weights) { /* zip(strict=True) raises */
            return FALLBACK;
        }
    }
    else {
        CHECK(phase_evidence(job, shared, ratios, weights, &n));
    }
    double total, weighted, mean;
    int64_t later = job->steps_seen - 1;
    if (later > 0 && job->step_prior > 0 && job->later_sum > 0) {
        double per_step, quotient, step_ratio, step_weight;
        per_step = job->later_sum / (double)later;
        DIV(quotient, per_step, job->step_prior);
        CHECK(math_log(quotient, &step_ratio));
        step_ratio = clamp_ratio(step_ratio);
        DIV(step_weight, 1.0, job->step_variance + STEP_NOISE * STEP_NOISE / (double)later);
        if (n == 0) { /* the loop's usual case before any phase ended: one piece */
            total = prior_weight + step_weight;
            DIV(mean, step_ratio * step_weight, total);
            goto memoise;
        }
        ratios[n] = step_ratio;
        weights[n] = step_weight;
        n++;
    }
    total = prior_weight;
    weighted = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        total += weights[i];
        weighted += ratios[i] * weights[i];
    }
    DIV(mean, weighted, total);
    if (n > 1) {
        for (long round = 0; round < SPEED_ROUNDS; round++) {
            total = prior_weight;
            weighted = 0.0;
            for (Py_ssize_t i = 0; i < n; i++) {
                double root, distance, counted;
                CHECK(math_1(sqrt, weights[i], &root));
                distance = fabs(ratios[i] - mean) * root;
                if (distance > SPEED_HUBER) {
                    DIV(counted, weights[i] * SPEED_HUBER, distance);
                }
                else {
                    counted = weights[i];
                }
                total += counted;
                weighted += ratios[i] * counted;
            }
            DIV(mean, weighted, total);
        }
    }
memoise:;
    double factor, inverse;
    CHECK(math_1(exp, mean, &factor));
    DIV(inverse, 1.0, total);
    double variance = inverse + surprise(mean, shared);
    PyObject *cache[2] = {PyFloat_FromDouble(factor), PyFloat_FromDouble(variance)};
    CHECK(write_memo(live, off_speed_key, key, off_speed_cache, 2, cache));
    *speed = factor;
    *speed_var = variance;
    return OK;
}

/* LiveJob._step_mean(speed): seconds per step from here on. */
static inline int
step_mean(Job *job, double speed, double *out)
{
    double prior = job->segment_prior;
    if (!job->segment_observed) {
        prior *= speed;
    }
    DIV(*out, PRIOR_STEPS * prior + job->segment_sum, PRIOR_STEPS + job->segment_n);
    return OK;
}

/* LiveJob._prior_share(mean). */
static inline int
prior_share(Job *job, double mean, double *out)
{
    if (job->segment_observed || mean <= 0) {
        *out = job->segment_observed ? 0.0 : 1.0;
        return OK;
    }
    double per, part;
    DIV(per, job->segment_sum, PRIOR_STEPS + job->segment_n);
    DIV(part, per, mean);
    double share = 1.0 - part;
    *out = share < 0.0 ? 0.0 : share;
    return OK;
}

/* LiveJob._loop_left(mean). */
static inline double
loop_left(Job *job, double mean)
{
    int64_t left = job->total_steps - job->steps_done;
    left = 0 > left ? 0 : left;
    if (job->steps_done == 0 && left) {
        return mean * ((double)(left - 1) + job->warmup);
    }
    return mean * (double)left;
}

/* conditional_remaining(expected, sigma, elapsed). */
static int
conditional_remaining(double expected, double sigma, double elapsed, double *out)
{
    if (expected <= 0) {
        *out = 0.0;
        return OK;
    }
    if (elapsed <= 0) {
        *out = expected;
        return OK;
    }
    double s, lp, log_expected, log_elapsed, z, tail, upper;
    CHECK(math_1(log1p, sigma * sigma, &lp));
    CHECK(math_1(sqrt, lp, &s));
    if (s == 0.0) {
        s = 1e-6;
    }
    CHECK(math_log(expected, &log_expected));
    double mu = log_expected - s * s / 2.0;
    CHECK(math_log(elapsed, &log_elapsed));
    DIV(z, log_elapsed - mu, s);
    const double root2 = sqrt(2.0);
    CHECK(math_1(erfc, z / root2, &tail));
    tail = 0.5 * tail;
    if (tail < 1e-12) {
        *out = expected * s * 0.1;
        return OK;
    }
    CHECK(math_1(erfc, (z - s) / root2, &upper));
    upper = 0.5 * upper;
    double part;
    DIV(part, expected * upper, tail);
    part = part - elapsed;
    *out = 0.0 > part ? 0.0 : part;
    return OK;
}

/* LiveJob._ahead(upcoming): the phases from `upcoming` on, not done, but the loop. */
static int
ahead(Job *job, Py_ssize_t upcoming, double *seconds_out, double *variance_out,
      int *denoise_out)
{
    PyObject *live = job->live;
    int64_t key = (int64_t)upcoming * 64 + PyDict_GET_SIZE(job->done);
    int match;
    CHECK(key_matches(SLOT(live, ahead_key), key, &match));
    if (match) {
        PyObject *memo = SLOT(live, ahead);
        if (memo == NULL || !PyTuple_CheckExact(memo) || PyTuple_GET_SIZE(memo) != 3) {
            return FALLBACK;
        }
        CHECK(read_float(PyTuple_GET_ITEM(memo, 0), seconds_out));
        CHECK(read_float(PyTuple_GET_ITEM(memo, 1), variance_out));
        CHECK(read_bool(PyTuple_GET_ITEM(memo, 2), denoise_out));
        return OK;
    }
    double seconds = 0.0, variance = 0.0;
    int denoise_ahead = 0;
    Py_ssize_t count = PyTuple_GET_SIZE(job->phases);
    for (Py_ssize_t i = upcoming; i < count; i++) {
        PyObject *phase = PyTuple_GET_ITEM(job->phases, i);
        if (!PyUnicode_CheckExact(phase)) {
            return FALLBACK;
        }
        int in = PyDict_Contains(job->done, phase);
        if (in < 0) {
            PyErr_Clear();
            return FALLBACK;
        }
        if (in) {
            continue;
        }
        if (PyUnicode_Compare(phase, str_denoise) == 0) {
            denoise_ahead = 1;
            continue;
        }
        double part, sigma, sq;
        CHECK(item_float(job->expected, phase, &part));
        seconds += part;
        CHECK(item_float(job->sigma, phase, &sigma));
        CHECK(square(part * sigma, &sq));
        variance += sq;
    }
    PyObject *memo[3] = {PyFloat_FromDouble(seconds), PyFloat_FromDouble(variance),
                         Py_NewRef(denoise_ahead ? Py_True : Py_False)};
    CHECK(write_memo(live, off_ahead_key, key, off_ahead, 3, memo));
    *seconds_out = seconds;
    *variance_out = variance;
    *denoise_out = denoise_ahead;
    return OK;
}

/* LiveJob._remaining(now, speed): seconds left, their variance, and the part that scales. */
/* LiveJob._pieces_left: what is left of a phase that reports its pieces (the same
 * operations in the same order). */
static int
pieces_left(Job *job, PyObject *phase, PyObject *now, double speed, int64_t pieces_done,
            double *part_out, double *sigma_out, double *scaled_out)
{
    PyObject *live = job->live;
    double units, seconds, expected, prior, pace, since, part, share, sigma, root, first, weight;
    int64_t pieces_total;
    CHECK(read_float(SLOT(live, piece_units), &units));
    CHECK(read_float(SLOT(live, first_piece), &first));
    CHECK(read_float(SLOT(live, piece_seconds), &seconds));
    CHECK(read_int(SLOT(live, pieces_total), &pieces_total));
    CHECK(item_float(job->expected, phase, &expected));
    DIV(prior, expected * speed, (double)pieces_total - 1.0 + first);
    weight = prior_pieces(speed, job->speed_tau);
    DIV(pace, weight * prior + seconds, weight + units);
    CHECK(seconds_between(now, SLOT(live, last_piece_ts), &since));
    part = (double)(pieces_total - pieces_done) * pace - (pace < since ? pace : since);
    part = 0.0 > part ? 0.0 : part;
    if (pace > 0) {
        double prior_part;
        DIV(prior_part, weight * prior, weight + units);
        DIV(share, prior_part, pace);
    }
    else {
        share = 1.0;
    }
    CHECK(item_float(job->sigma, phase, &sigma));
    CHECK(math_1(sqrt, 1.0 + units, &root));
    DIV(*sigma_out, sigma, root);
    *part_out = part;
    *scaled_out = part * share;
    return OK;
}

static int
remaining_parts(Job *job, PyObject *now, double speed, double *seconds_out,
                double *variance_out, double *scaled_out)
{
    PyObject *live = job->live;
    PyObject *phases = job->phases, *current = SLOT(live, phase), *phase_start;
    double seconds = 0.0, variance = 0.0, scaled = 0.0;
    if (current == NULL) {
        return FALLBACK;
    }
    if (current == Py_None && PyDict_GET_SIZE(job->done) == 0) {
        current = PyTuple_GET_SIZE(phases) ? PyTuple_GET_ITEM(phases, 0) : Py_None;
        phase_start = SLOT(live, start_ts);
    }
    else {
        PyObject *start = SLOT(live, phase_start_ts);
        int64_t value;
        if (start == Py_None) {
            phase_start = now;
        }
        else {
            CHECK(read_int(start, &value));
            phase_start = value ? start : now;
        }
    }
    Py_ssize_t upcoming = 0;
    if (current != Py_None) {
        if (!PyUnicode_CheckExact(current)) {
            return FALLBACK;
        }
        Py_ssize_t index = -1, count = PyTuple_GET_SIZE(phases);
        for (Py_ssize_t i = 0; i < count; i++) {
            int equal = PyObject_RichCompareBool(PyTuple_GET_ITEM(phases, i), current, Py_EQ);
            if (equal < 0) {
                PyErr_Clear();
                return FALLBACK;
            }
            if (equal) {
                index = i;
                break;
            }
        }
        if (index < 0) { /* a stage outside the plan: nothing is counted */
            *seconds_out = *variance_out = *scaled_out = 0.0;
            return OK;
        }
        double part, sigma;
        if (PyUnicode_Compare(current, str_denoise) == 0) {
            double mean, since_step, share, root, denoise_sigma;
            CHECK(step_mean(job, speed, &mean));
            PyObject *last_step = SLOT(live, last_step_ts);
            int64_t value;
            if (last_step == Py_None) {
                since_step = 0.0; /* (now - now) / 1e9 */
                CHECK(read_int(now, &value));
            }
            else {
                CHECK(read_int(last_step, &value));
                CHECK(seconds_between(now, value ? last_step : now, &since_step));
            }
            part = loop_left(job, mean) - (mean < since_step ? mean : since_step);
            part = 0.0 > part ? 0.0 : part;
            CHECK(item_float(job->sigma, str_denoise, &denoise_sigma));
            CHECK(math_1(sqrt, 1.0 + job->segment_n, &root));
            DIV(sigma, denoise_sigma, root);
            CHECK(prior_share(job, mean, &share));
            scaled = part * share;
        }
        else {
            int64_t pieces_done;
            CHECK(read_int(SLOT(live, pieces_done), &pieces_done));
            if (pieces_done) {
                CHECK(pieces_left(job, current, now, speed, pieces_done, &part, &sigma,
                                  &scaled));
                goto counted;
            }
            double expected, in_phase;
            CHECK(item_float(job->expected, current, &expected));
            expected = expected * speed;
            CHECK(seconds_between(now, phase_start, &in_phase));
            CHECK(item_float(job->sigma, current, &sigma));
            CHECK(conditional_remaining(expected, sigma, in_phase, &part));
            if (expected > 0) {
                double ratio;
                DIV(ratio, in_phase, expected);
                sigma *= 1.0 + ratio;
            }
            else {
                sigma *= 1.0;
            }
            scaled = part;
        }
    counted:
        seconds = part;
        CHECK(square(part * sigma, &variance));
        upcoming = index + 1;
    }
    double fixed, fixed_variance;
    int denoise_ahead;
    CHECK(ahead(job, upcoming, &fixed, &fixed_variance, &denoise_ahead));
    seconds += fixed * speed;
    scaled += fixed * speed;
    variance += fixed_variance * speed * speed;
    if (denoise_ahead) {
        double mean, part, sigma, share, sq;
        CHECK(step_mean(job, speed, &mean));
        part = loop_left(job, mean);
        CHECK(item_float(job->sigma, str_denoise, &sigma));
        seconds += part;
        CHECK(prior_share(job, mean, &share));
        scaled += part * share;
        CHECK(square(part * sigma, &sq));
        variance += sq;
    }
    *seconds_out = seconds;
    *variance_out = variance;
    *scaled_out = scaled;
    return OK;
}

/* bucket_of's index: bisect_right over the edges (NaN: the last). */
static inline Py_ssize_t
bucket_index(double progress)
{
    Py_ssize_t lo = 0, hi = n_bucket_edges;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (progress < bucket_edges[mid]) {
            hi = mid;
        }
        else {
            lo = mid + 1;
        }
    }
    return lo;
}

/* The progress bucket's name (bucket_of). */
static inline PyObject *
bucket_of(double progress)
{
    return PyTuple_GET_ITEM(buckets, bucket_index(progress));
}

/* LiveJob.estimate_fields(now), or FALLBACK. On OK, *result is the new 5-tuple. */
static int
estimate(PyObject *live, PyObject *now, PyObject **result)
{
    Job job;
    CHECK(load(live, &job));
    double elapsed, speed, speed_var, seconds, variance, scaled, remaining, last_band;
    double last_progress, low, high, progress, total;
    CHECK(seconds_between(now, SLOT(live, start_ts), &elapsed));
    elapsed = 0.0 > elapsed ? 0.0 : elapsed;
    PyObject *offsets = SLOT(live, offsets);
    if (offsets == NULL || !PyDict_CheckExact(offsets)) {
        return FALLBACK;
    }
    CHECK(read_float(SLOT(live, last_band), &last_band));
    CHECK(read_float(SLOT(live, last_progress), &last_progress));
    PyObject *last_remaining = SLOT(live, last_remaining), *last_ts = SLOT(live, last_ts);
    double last_remaining_s = 0.0;
    int damped = last_remaining != Py_None && last_ts != Py_None;
    if (damped) {
        CHECK(read_float(last_remaining, &last_remaining_s));
    }
    CHECK(speed_and_variance(&job, &speed, &speed_var));
    CHECK(remaining_parts(&job, now, speed, &seconds, &variance, &scaled));
    /* damp_rise */
    remaining = seconds;
    if (damped) {
        double gone, ceiling;
        CHECK(seconds_between(now, last_ts, &gone));
        ceiling = last_remaining_s - gone;
        ceiling = (0.0 > ceiling ? 0.0 : ceiling) + last_band;
        if (remaining > ceiling) {
            remaining = ceiling + 0.5 * (remaining - ceiling);
        }
    }
    total = elapsed + remaining;
    if (total > 0) {
        progress = elapsed / total;
    }
    else {
        progress = 0.0;
    }
    progress = last_progress > progress ? last_progress : progress;
    if (remaining <= 0) {
        low = high = 0.0;
    }
    else {
        double quotient, spread, below, above, e_below, e_above;
        DIV(quotient, variance + scaled * scaled * speed_var, remaining * remaining);
        CHECK(math_1(sqrt, quotient, &spread));
        spread = spread * Z90;
        below = above = spread;
        if (PyDict_GET_SIZE(offsets)) {
            PyObject *shift = PyDict_GetItemWithError(offsets, bucket_of(progress));
            if (shift == NULL && PyErr_Occurred()) {
                PyErr_Clear();
                return FALLBACK;
            }
            if (shift != NULL) {
                double shift_low, shift_high;
                if (!PyTuple_CheckExact(shift) || PyTuple_GET_SIZE(shift) != 2) {
                    return FALLBACK;
                }
                CHECK(read_float(PyTuple_GET_ITEM(shift, 0), &shift_low));
                CHECK(read_float(PyTuple_GET_ITEM(shift, 1), &shift_high));
                below = spread + shift_low;
                above = spread + shift_high;
            }
        }
        CHECK(math_1(exp, -below, &e_below));
        CHECK(math_1(exp, above, &e_above));
        low = remaining * e_below;
        high = remaining * e_above;
    }
    /* issued: self.last_remaining, self.last_ts, self.last_band = ...; last_progress */
    PyObject *r = PyFloat_FromDouble(remaining);
    PyObject *lo = PyFloat_FromDouble(low);
    PyObject *hi = PyFloat_FromDouble(high);
    PyObject *pr = PyFloat_FromDouble(progress);
    PyObject *band = PyFloat_FromDouble(high - remaining);
    PyObject *fields = (r && lo && hi && pr && band)
                           ? PyTuple_Pack(5, r, lo, hi, pr,
                                          job.steps_seen < 2 ? Py_True : Py_False)
                           : NULL;
    Py_XDECREF(lo);
    Py_XDECREF(hi);
    if (fields == NULL) {
        Py_XDECREF(r);
        Py_XDECREF(pr);
        Py_XDECREF(band);
        return ERROR;
    }
    write_slot(live, off_last_remaining, r);
    Py_INCREF(now);
    write_slot(live, off_last_ts, now);
    write_slot(live, off_last_band, band);
    write_slot(live, off_last_progress, pr);
    *result = fields;
    return OK;
}

/* LiveJob.step_ended(total_steps, duration_s, expert, ts), or FALLBACK (before any write). */
static int
step(PyObject *live, PyObject *total_obj, PyObject *duration, PyObject *expert, PyObject *ts)
{
    Job job;
    CHECK(load(live, &job));
    int64_t total_arg;
    double duration_s = 0.0;
    CHECK(read_int(total_obj, &total_arg));
    if (duration != Py_None) {
        CHECK(read_float(duration, &duration_s));
    }
    PyObject *current = SLOT(live, expert);
    if (current == NULL || (current != Py_None && !PyUnicode_CheckExact(current)) ||
        (expert != Py_None && !PyUnicode_CheckExact(expert))) {
        return FALLBACK;
    }
    int switched;
    if (current == Py_None || expert == Py_None) {
        switched = current != expert;
    }
    else {
        switched = PyUnicode_Compare(expert, current) != 0;
    }
    /* What a switch of expert computes, before anything is written. */
    double segment_prior = job.segment_prior;
    int new_prior = 0;
    if (switched && current != Py_None && job.segment_n > 0) {
        double speed = 1.0, speed_var;
        if (!job.segment_observed) {
            CHECK(speed_and_variance(&job, &speed, &speed_var));
        }
        CHECK(step_mean(&job, speed, &segment_prior));
        new_prior = 1;
    }
    double segment_sum = switched ? 0.0 : job.segment_sum;
    double segment_n = switched ? 0.0 : job.segment_n;
    double later_sum = job.later_sum;
    int64_t steps_seen = job.steps_seen;
    if (duration != Py_None) {
        double weight, value;
        steps_seen += 1;
        if (steps_seen == 1) {
            double warmup = 1e-6 > job.warmup ? 1e-6 : job.warmup; /* max(warmup, 1e-6) */
            weight = WARMUP_WEIGHT;
            DIV(value, duration_s, warmup);
        }
        else {
            later_sum += duration_s;
            weight = 1.0;
            value = duration_s;
        }
        segment_sum += weight * value;
        segment_n += weight;
    }
    /* The writes, in the Python's order. */
    int64_t steps_done = job.steps_done + 1;
    CHECK(write_int(live, off_steps_done, steps_done));
    if (steps_done > total_arg) {
        if (steps_done != job.total_steps) {
            CHECK(write_int(live, off_total_steps, steps_done));
        }
    }
    else if (total_arg != job.total_steps) {
        Py_INCREF(total_obj);
        write_slot(live, off_total_steps, total_obj);
    }
    Py_INCREF(ts);
    write_slot(live, off_last_step_ts, ts);
    if (switched) {
        if (new_prior) {
            CHECK(write_float(live, off_segment_prior, segment_prior));
            Py_INCREF(Py_True);
            write_slot(live, off_segment_observed, Py_True);
        }
        Py_INCREF(expert);
        write_slot(live, off_expert, expert);
    }
    if (duration != Py_None) {
        CHECK(write_int(live, off_steps_seen, steps_seen));
        if (steps_seen == 1) {
            Py_INCREF(duration);
            write_slot(live, off_first_step_s, duration);
        }
        else {
            CHECK(write_float(live, off_later_sum, later_sum));
        }
    }
    if (switched || duration != Py_None) {
        CHECK(write_float(live, off_segment_sum, segment_sum));
        CHECK(write_float(live, off_segment_n, segment_n));
    }
    return OK;
}

/* -- scoring a completed job's ETAs ------------------------------------------------------------ */

/* What score_issued reads, looked up at its first call (telemetry.projections.eta imports this
 * module's caller, telemetry.eta.live, so it cannot be imported when this one is). */
static PyTypeObject *EtaPoint_Type;
static PyObject *eta_projection; /* telemetry.projections.eta: its score_issued is the rule */
static PyObject *str_score_issued;
static double MIN_SCORED_S;
static Py_ssize_t off_point_ts, off_point_remaining_s, off_point_p10_s, off_point_p90_s,
    off_point_progress;

static int offset_in(PyTypeObject *type, const char *name, Py_ssize_t *out);
static int constant(PyObject *module, const char *name, double *out);

/* What a setup reads from Python, in tables: a module's float constants, a type's slots. */
typedef struct {
    const char *name;
    double *out;
} ConstantRef;

typedef struct {
    const char *name;
    Py_ssize_t *out;
} SlotRef;

static int
constants_in(PyObject *module, const ConstantRef *refs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (constant(module, refs[i].name, refs[i].out) < 0) {
            return -1;
        }
    }
    return 0;
}

static int
slots_in(PyTypeObject *type, const SlotRef *refs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (offset_in(type, refs[i].name, refs[i].out) < 0) {
            return -1;
        }
    }
    return 0;
}

#define COUNT(table) (sizeof(table) / sizeof((table)[0]))

static int
score_setup(void)
{
    PyObject *eta = PyImport_ImportModule("telemetry.projections.eta");
    if (eta == NULL) {
        return -1;
    }
    PyObject *point = PyObject_GetAttrString(eta, "EtaPoint");
    int status = -1;
    if (point == NULL) {
        goto done;
    }
    if (!PyType_Check(point)) {
        PyErr_SetString(PyExc_TypeError, "telemetry.projections.eta.EtaPoint is not a type");
        goto done;
    }
    static const SlotRef point_slots[] = {
        {"ts", &off_point_ts}, {"remaining_s", &off_point_remaining_s},
        {"p10_s", &off_point_p10_s}, {"p90_s", &off_point_p90_s},
        {"progress", &off_point_progress},
    };
    if (constant(eta, "MIN_SCORED_S", &MIN_SCORED_S) < 0 ||
        slots_in((PyTypeObject *)point, point_slots, COUNT(point_slots)) < 0) {
        goto done;
    }
    EtaPoint_Type = (PyTypeObject *)point;
    point = NULL;
    eta_projection = eta;
    eta = NULL;
    status = 0;
done:
    Py_XDECREF(point);
    Py_XDECREF(eta);
    return status;
}

#define POINT_SLOT(o, name) (*(PyObject **)((char *)(o) + off_point_##name))
#define MAX_BUCKETS 9
#define STACK_POINTS 64


/* score_issued(issued, end_ts) (telemetry/projections/eta.py, the rule), or FALLBACK for
 * anything but a list of exact EtaPoints with int times within ±2**62 and float fields.
 * Two passes: the errors and buckets into C arrays, then each bucket's list made at its size. */
static int
score(PyObject *issued, PyObject *end, PyObject **result)
{
    int64_t end_ts;
    if (!PyList_CheckExact(issued)) {
        return FALLBACK;
    }
    CHECK(read_int(end, &end_ts));
    Py_ssize_t n = PyList_GET_SIZE(issued);
    double stack_errors[STACK_POINTS];
    signed char stack_bucket[STACK_POINTS];
    double *errors = stack_errors;
    signed char *bucket_at = stack_bucket;
    if (n > STACK_POINTS) {
        errors = PyMem_Malloc((size_t)n * sizeof(double));
        bucket_at = PyMem_Malloc((size_t)n);
        if (errors == NULL || bucket_at == NULL) {
            if (errors != NULL) {
                PyMem_Free(errors);
            }
            if (bucket_at != NULL) {
                PyMem_Free(bucket_at);
            }
            PyErr_NoMemory();
            return ERROR;
        }
    }
    /* Per bucket index: its place in the order reached (-1: not reached), first point, counts. */
    Py_ssize_t order[MAX_BUCKETS], reached[MAX_BUCKETS];
    /* Each bucket's first point, a reference taken in the first pass (which allocates nothing,
     * so runs no other Python code): a finaliser run by the collector while the result is
     * built could change the list. Owned until a result tuple takes it. */
    PyObject *first[MAX_BUCKETS];
    Py_ssize_t count[MAX_BUCKETS], covered[MAX_BUCKETS], below[MAX_BUCKETS], above[MAX_BUCKETS];
    Py_ssize_t n_reached = 0;
    int status = OK;
    for (Py_ssize_t b = 0; b < MAX_BUCKETS; b++) {
        order[b] = -1;
        count[b] = covered[b] = below[b] = above[b] = 0;
    }
    for (Py_ssize_t i = 1; i < n; i++) {
        PyObject *point = PyList_GET_ITEM(issued, i);
        int64_t ts;
        double remaining, p10, p90, progress;
        bucket_at[i] = -1;
        if (Py_TYPE(point) != EtaPoint_Type) {
            status = FALLBACK;
            break;
        }
        if ((status = read_int(POINT_SLOT(point, ts), &ts)) != OK ||
            (status = read_float(POINT_SLOT(point, remaining_s), &remaining)) != OK ||
            (status = read_float(POINT_SLOT(point, p10_s), &p10)) != OK ||
            (status = read_float(POINT_SLOT(point, p90_s), &p90)) != OK ||
            (status = read_float(POINT_SLOT(point, progress), &progress)) != OK) {
            break;
        }
        /* actual = (end_ts - point.ts) / 1e9: the int difference (exact: both within ±2**62),
         * converted as CPython converts an int (round half to even), then divided. */
        double actual = (double)(end_ts - ts) / 1e9;
        if (actual <= MIN_SCORED_S || !isfinite(remaining)) {
            continue;
        }
        Py_ssize_t b = bucket_index(progress);
        if (order[b] < 0) {
            order[b] = n_reached;
            reached[n_reached++] = b;
            first[b] = point;
            Py_INCREF(point);
        }
        bucket_at[i] = (signed char)b;
        errors[i] = (remaining - actual) / actual;
        count[b]++;
        covered[b] += p10 <= actual && actual <= p90;
        below[b] += actual < p10;
        above[b] += actual > p90;
    }
    PyObject *scores = NULL;
    if (status != OK) {
        goto done;
    }
    scores = PyList_New(n_reached);
    if (scores == NULL) {
        status = ERROR;
        goto done;
    }
    PyObject *lists[MAX_BUCKETS];
    Py_ssize_t filled[MAX_BUCKETS];
    for (Py_ssize_t k = 0; k < n_reached; k++) {
        Py_ssize_t b = reached[k];
        PyObject *list = PyList_New(count[b]);
        PyObject *tuple = list == NULL ? NULL : PyTuple_New(6);
        if (tuple == NULL) {
            Py_XDECREF(list);
            status = ERROR;
            goto done;
        }
        PyObject *bucket = PyTuple_GET_ITEM(buckets, b);
        Py_INCREF(bucket);
        PyTuple_SET_ITEM(tuple, 0, bucket);
        PyTuple_SET_ITEM(tuple, 1, first[b]);
        first[b] = NULL;
        PyTuple_SET_ITEM(tuple, 2, list); /* filled below: NULL items until then */
        PyList_SET_ITEM(scores, k, tuple);
        PyObject *c = PyLong_FromSsize_t(covered[b]);
        PyObject *lo = PyLong_FromSsize_t(below[b]);
        PyObject *hi = PyLong_FromSsize_t(above[b]);
        if (c == NULL || lo == NULL || hi == NULL) {
            Py_XDECREF(c);
            Py_XDECREF(lo);
            Py_XDECREF(hi);
            status = ERROR;
            goto done;
        }
        PyTuple_SET_ITEM(tuple, 3, c);
        PyTuple_SET_ITEM(tuple, 4, lo);
        PyTuple_SET_ITEM(tuple, 5, hi);
        lists[b] = list;
        filled[b] = 0;
    }
    for (Py_ssize_t i = 1; i < n; i++) {
        int b = bucket_at[i];
        if (b < 0) {
            continue;
        }
        PyObject *v = PyFloat_FromDouble(errors[i]);
        if (v == NULL) {
            status = ERROR;
            goto done;
        }
        PyList_SET_ITEM(lists[b], filled[b]++, v);
    }
done:
    if (errors != stack_errors) {
        PyMem_Free(errors);
        PyMem_Free(bucket_at);
    }
    for (Py_ssize_t k = 0; k < n_reached; k++) {
        Py_XDECREF(first[reached[k]]); /* NULL once a tuple took it */
    }
    if (status != OK) {
        Py_XDECREF(scores); /* a list's NULL items are skipped when it is freed */
        return status;
    }
    *result = scores;
    return OK;
}

/* -- what was learned online: a job's start and its end ------------------------------------- */

/* corrected(prior, learned, steps, tau) is telemetry.eta.live.corrected and learn(learned,
 * observations, warmup_key, warmup_ratio) is telemetry.eta.online.learn (the rules): the same
 * arithmetic in the same order, the same writes. Both check everything they read before they
 * write anything, so a fallback to the rule happens before any change; learn falls back, too,
 * where two of a job's phases share a statistic (the rule updates it twice: rare, left to it). */
static PyTypeObject *Prior_Type, *Learned_Type, *PhaseKeys_Type, *Observation_Type;
static PyObject *online_module, *live_module, *str_step, *str_corrected, *str_learn;
static double SHRINK_DEVICE, SHRINK_COMPONENT, SHRINK_FAMILY, SLOPE_RIDGE, HUBER_K,
    START_SPREAD, MEMORY_DEVICE, MEMORY_COMPONENT, MEMORY_FAMILY, MIN_SPEED_VARIANCE,
    MIN_SPEED_SPREAD;
static Py_ssize_t MAX_FAMILIES;
static Py_ssize_t off_levels, off_components, off_shared, off_families, off_error, off_warmup_of,
    off_jobs, off_keys_device, off_keys_component, off_keys_family, off_keys_size, off_obs_phase,
    off_obs_keys, off_obs_base, off_obs_expected, off_obs_observed;

#define AT(o, offset) (*(PyObject **)((char *)(o) + (offset)))
#define MAX_PHASES 16

static int
dict_constant(PyObject *module, const char *name, const char *key, double *out)
{
    PyObject *dict = PyObject_GetAttrString(module, name);
    if (dict == NULL) {
        return -1;
    }
    PyObject *v = PyDict_Check(dict) ? PyDict_GetItemString(dict, key) : NULL;
    if (v == NULL) {
        Py_DECREF(dict);
        PyErr_Format(PyExc_ImportError, "%s[%s] is missing", name, key);
        return -1;
    }
    *out = PyFloat_AsDouble(v);
    Py_DECREF(dict);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static PyTypeObject *
type_in(PyObject *module, const char *name)
{
    PyObject *type = PyObject_GetAttrString(module, name);
    if (type != NULL && !PyType_Check(type)) {
        PyErr_Format(PyExc_ImportError, "%s is not a type", name);
        Py_CLEAR(type);
    }
    return (PyTypeObject *)type;
}

/* What online learning reads, looked up at the first call (telemetry.eta.live is whole then). */
static int
online_setup(void)
{
    PyObject *online = PyImport_ImportModule("telemetry.eta.online");
    PyObject *live = online == NULL ? NULL : PyImport_ImportModule("telemetry.eta.live");
    PyObject *families = NULL;
    if (live == NULL) {
        goto error;
    }
    Prior_Type = type_in(live, "Prior");
    Learned_Type = type_in(online, "Learned");
    PhaseKeys_Type = type_in(online, "PhaseKeys");
    Observation_Type = type_in(online, "Observation");
    if (Prior_Type == NULL || Learned_Type == NULL || PhaseKeys_Type == NULL ||
        Observation_Type == NULL) {
        goto error;
    }
    static const ConstantRef constants[] = {
        {"SLOPE_RIDGE", &SLOPE_RIDGE}, {"HUBER_K", &HUBER_K}, {"START_SPREAD", &START_SPREAD},
        {"MIN_SPEED_VARIANCE", &MIN_SPEED_VARIANCE}, {"MIN_SPEED_SPREAD", &MIN_SPEED_SPREAD},
    };
    static const SlotRef learned_slots[] = {
        {"levels", &off_levels}, {"components", &off_components}, {"shared", &off_shared},
        {"families", &off_families}, {"error", &off_error}, {"warmup", &off_warmup_of},
        {"jobs", &off_jobs},
    };
    static const SlotRef keys_slots[] = {
        {"device", &off_keys_device}, {"component", &off_keys_component},
        {"family", &off_keys_family}, {"size", &off_keys_size},
    };
    static const SlotRef observation_slots[] = {
        {"phase", &off_obs_phase}, {"keys", &off_obs_keys}, {"base", &off_obs_base},
        {"expected", &off_obs_expected}, {"observed", &off_obs_observed},
    };
    if (dict_constant(online, "SHRINK", "device", &SHRINK_DEVICE) < 0 ||
        dict_constant(online, "SHRINK", "component", &SHRINK_COMPONENT) < 0 ||
        dict_constant(online, "SHRINK", "family", &SHRINK_FAMILY) < 0 ||
        dict_constant(online, "MEMORY", "device", &MEMORY_DEVICE) < 0 ||
        dict_constant(online, "MEMORY", "component", &MEMORY_COMPONENT) < 0 ||
        dict_constant(online, "MEMORY", "family", &MEMORY_FAMILY) < 0 ||
        constants_in(online, constants, COUNT(constants)) < 0 ||
        slots_in(Learned_Type, learned_slots, COUNT(learned_slots)) < 0 ||
        slots_in(PhaseKeys_Type, keys_slots, COUNT(keys_slots)) < 0 ||
        slots_in(Observation_Type, observation_slots, COUNT(observation_slots)) < 0) {
        goto error;
    }
    families = PyObject_GetAttrString(online, "MAX_FAMILIES");
    if (families == NULL || (MAX_FAMILIES = PyLong_AsSsize_t(families)) < 0) {
        goto error;
    }
    str_step = PyUnicode_InternFromString("step");
    str_corrected = PyUnicode_InternFromString("corrected");
    str_learn = PyUnicode_InternFromString("learn");
    if (str_step == NULL || str_corrected == NULL || str_learn == NULL) {
        goto error;
    }
    Py_DECREF(families);
    online_module = online;
    live_module = live;
    return 0;
error:
    Py_XDECREF(families);
    Py_XDECREF(online);
    Py_XDECREF(live);
    Py_CLEAR(Prior_Type);
    Py_CLEAR(Learned_Type);
    Py_CLEAR(PhaseKeys_Type);
    Py_CLEAR(Observation_Type);
    return -1;
}

/* A PhaseKeys' fields: three exact strs and a float. */
typedef struct {
    PyObject *device, *component, *family;
    double size;
} Keys;

static int
keys_of(PyObject *keys, Keys *out)
{
    if (keys == NULL || Py_TYPE(keys) != PhaseKeys_Type) {
        return FALLBACK;
    }
    out->device = AT(keys, off_keys_device);
    out->component = AT(keys, off_keys_component);
    out->family = AT(keys, off_keys_family);
    if (out->device == NULL || !PyUnicode_CheckExact(out->device) || out->component == NULL ||
        !PyUnicode_CheckExact(out->component) || out->family == NULL ||
        !PyUnicode_CheckExact(out->family)) {
        return FALLBACK;
    }
    return read_float(AT(keys, off_keys_size), &out->size);
}

/* dict.get(key) for a dict of statistics: *list the list (borrowed; NULL if absent), its
 * ``n`` floats in values. A list of another length or anything but floats: FALLBACK. */
static int
stats_get(PyObject *dict, PyObject *key, Py_ssize_t n, PyObject **list, double *values)
{
    PyObject *v = PyDict_GetItemWithError(dict, key);
    *list = v;
    if (v == NULL) {
        if (PyErr_Occurred()) {
            PyErr_Clear();
            return FALLBACK;
        }
        return OK;
    }
    if (!PyList_CheckExact(v) || PyList_GET_SIZE(v) != n) {
        return FALLBACK;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        CHECK(read_float(PyList_GET_ITEM(v, i), &values[i]));
    }
    return OK;
}

/* online.shrunk(stats, shrink) of a level's [mean, spread, weight]. */
static inline int
shrunk_of(const double *stats, double shrink, double *out)
{
    DIV(*out, stats[0] * stats[2], stats[2] + shrink);
    return OK;
}

/* online.on_line(sums, size) of a component's [Σw, Σwx, Σwx², Σwy, Σwxy, spread]. */
static inline int
on_line_of(const double *sums, double size, double *out)
{
    double mean_x, mean_y, slope;
    DIV(mean_x, sums[1], sums[0]);
    DIV(mean_y, sums[3], sums[0]);
    DIV(slope, sums[4] - sums[1] * mean_y, sums[2] - sums[1] * mean_x + SLOPE_RIDGE);
    *out = mean_y + slope * (size - mean_x);
    return OK;
}

/* The dictionaries of a Learned, checked. */
typedef struct {
    PyObject *levels, *components, *shared, *families, *error, *warmup;
} Learning;

static int
learning_of(PyObject *learned, Learning *out)
{
    if (Py_TYPE(learned) != Learned_Type) {
        return FALLBACK;
    }
    out->levels = AT(learned, off_levels);
    out->components = AT(learned, off_components);
    out->shared = AT(learned, off_shared);
    out->families = AT(learned, off_families);
    out->error = AT(learned, off_error);
    out->warmup = AT(learned, off_warmup_of);
    PyObject *all[6] = {out->levels, out->components, out->shared, out->families, out->error,
                        out->warmup};
    for (int i = 0; i < 6; i++) {
        if (all[i] == NULL || !PyDict_CheckExact(all[i])) {
            return FALLBACK;
        }
    }
    return OK;
}

/* online.correction(learned, keys, device). */
static int
correction_of(const Learning *learned, const Keys *keys, double device, double *out)
{
    PyObject *list;
    double sums[6], family[3], component = 0.0, family_part = 0.0;
    CHECK(stats_get(learned->components, keys->component, 6, &list, sums));
    if (list != NULL) {
        double fitted;
        CHECK(on_line_of(sums, keys->size, &fitted));
        DIV(component, fitted * sums[0], sums[0] + SHRINK_COMPONENT);
    }
    CHECK(stats_get(learned->families, keys->family, 3, &list, family));
    if (list != NULL) {
        CHECK(shrunk_of(family, SHRINK_FAMILY, &family_part));
    }
    *out = device + component + family_part;
    return OK;
}

/* online.predictive_sigma(learned, component, fallback). */
static int
predictive_sigma_of(const Learning *learned, PyObject *component, double fallback_value,
                    double *out)
{
    PyObject *list;
    double error[2];
    CHECK(stats_get(learned->error, component, 2, &list, error));
    if (list == NULL || error[1] < 3) {
        *out = fallback_value;
    }
    else {
        double scaled = 1.25 * error[0];
        *out = 0.03 > scaled ? 0.03 : scaled; /* max(1.25 * error[0], 0.03) */
    }
    return OK;
}

/* An exact str equal to another. */
static inline int
same_str(PyObject *a, PyObject *b)
{
    return a == b || PyUnicode_Compare(a, b) == 0;
}

/* telemetry.eta.live.corrected(prior, learned, steps, tau), or FALLBACK. */
static int
correct(PyObject *prior, PyObject *learned_obj, PyObject *steps_obj, PyObject *tau_obj,
        PyObject **result)
{
    Learning learned;
    if (Py_TYPE(prior) != Prior_Type || PyTuple_GET_SIZE(prior) != 6) {
        return FALLBACK;
    }
    CHECK(learning_of(learned_obj, &learned));
    PyObject *phases = PyTuple_GET_ITEM(prior, 0), *expected = PyTuple_GET_ITEM(prior, 1);
    PyObject *sigma = PyTuple_GET_ITEM(prior, 2), *keys = PyTuple_GET_ITEM(prior, 5);
    if (!PyTuple_CheckExact(phases) || !PyDict_CheckExact(expected) ||
        !PyDict_CheckExact(sigma) || !PyDict_CheckExact(keys)) {
        return FALLBACK;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(phases);
    if (n > MAX_PHASES) {
        return FALLBACK;
    }
    double step, warmup, tau, device, factor;
    int64_t steps;
    CHECK(read_float(PyTuple_GET_ITEM(prior, 3), &step));
    CHECK(read_float(PyTuple_GET_ITEM(prior, 4), &warmup));
    CHECK(read_float(tau_obj, &tau));
    CHECK(read_int(steps_obj, &steps));
    Keys step_keys, phase_keys;
    PyObject *found = PyDict_GetItemWithError(keys, str_step);
    if (found == NULL) {
        PyErr_Clear();
        return FALLBACK;
    }
    CHECK(keys_of(found, &step_keys));
    PyObject *list;
    double stats[3];
    CHECK(stats_get(learned.levels, step_keys.device, 3, &list, stats));
    device = 0.0;
    if (list != NULL) {
        CHECK(shrunk_of(stats, SHRINK_DEVICE, &device));
    }
    CHECK(correction_of(&learned, &step_keys, device, &factor));
    CHECK(math_1(exp, factor, &factor));
    step *= factor;
    CHECK(stats_get(learned.warmup, step_keys.component, 3, &list, stats));
    if (list != NULL) {
        CHECK(math_1(exp, stats[0], &warmup));
    }
    double new_expected[MAX_PHASES], new_sigma[MAX_PHASES];
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *phase = PyTuple_GET_ITEM(phases, i);
        if (!PyUnicode_CheckExact(phase)) {
            return FALLBACK;
        }
        for (Py_ssize_t j = 0; j < i; j++) { /* a phase twice: the rule corrects it twice */
            if (same_str(phase, PyTuple_GET_ITEM(phases, j))) {
                return FALLBACK;
            }
        }
        const Keys *these = &step_keys;
        if (same_str(phase, str_denoise)) {
            new_expected[i] = step * ((double)(steps - 1 > 0 ? steps - 1 : 0) + warmup);
        }
        else {
            double base;
            found = PyDict_GetItemWithError(keys, phase);
            if (found == NULL) {
                PyErr_Clear();
                return FALLBACK;
            }
            CHECK(keys_of(found, &phase_keys));
            these = &phase_keys;
            CHECK(item_float(expected, phase, &base));
            CHECK(correction_of(&learned, these, device, &factor));
            CHECK(math_1(exp, factor, &factor));
            new_expected[i] = base * factor;
        }
        double prior_sigma;
        CHECK(item_float(sigma, phase, &prior_sigma));
        CHECK(predictive_sigma_of(&learned, these->component, prior_sigma, &new_sigma[i]));
    }
    /* online.speed_spread(learned, step_keys.device, tau) */
    double shared[2];
    CHECK(stats_get(learned.shared, step_keys.device, 2, &list, shared));
    if (list != NULL && !(shared[1] < 5)) {
        if (shared[0] > MIN_SPEED_VARIANCE) {
            CHECK(math_1(sqrt, shared[0], &tau));
        }
        else {
            tau = MIN_SPEED_SPREAD;
        }
    }
    /* Everything is known: the new dictionaries and the result. */
    PyObject *expected_copy = PyDict_Copy(expected), *sigma_copy = PyDict_Copy(sigma);
    PyObject *out = NULL;
    if (expected_copy == NULL || sigma_copy == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *phase = PyTuple_GET_ITEM(phases, i);
        PyObject *e = PyFloat_FromDouble(new_expected[i]);
        if (e == NULL || PyDict_SetItem(expected_copy, phase, e) < 0) {
            Py_XDECREF(e);
            goto error;
        }
        Py_DECREF(e);
        PyObject *s = PyFloat_FromDouble(new_sigma[i]);
        if (s == NULL || PyDict_SetItem(sigma_copy, phase, s) < 0) {
            Py_XDECREF(s);
            goto error;
        }
        Py_DECREF(s);
    }
    out = Py_BuildValue("(dOOdd)", step, expected_copy, sigma_copy, warmup, tau);
error:
    Py_XDECREF(expected_copy);
    Py_XDECREF(sigma_copy);
    if (out == NULL) {
        return ERROR;
    }
    *result = out;
    return OK;
}

/* online.update's arithmetic: a level's [mean, spread, weight] after one more ``value`` (in
 * place in ``stats``; ``found`` 0: a new level). */
static inline int
update_stats(double *stats, int found, double value, double memory)
{
    if (!found) {
        stats[0] = value;
        stats[1] = START_SPREAD;
        stats[2] = 1.0;
        return OK;
    }
    double mean = stats[0], spread = stats[1], weight = stats[2], alpha;
    double limit = HUBER_K * (0.02 > spread ? 0.02 : spread);
    double deviation = value - mean;
    double clipped = deviation < -limit ? -limit : (deviation > limit ? limit : deviation);
    weight = weight + 1.0 < memory ? weight + 1.0 : memory;
    DIV(alpha, 1.0, weight);
    stats[0] = mean + alpha * clipped;
    stats[1] = weight > 1.0 ? spread + alpha * (fabs(clipped) - spread) : spread;
    stats[2] = weight;
    return OK;
}

/* online._mean_into's arithmetic on [mean, weight] (``found`` 0: [value, 1.0]). */
static inline int
mean_into(double *stats, int found, double value, double memory)
{
    if (!found) {
        stats[0] = value;
        stats[1] = 1.0;
        return OK;
    }
    double weight = stats[1] + 1.0 < memory ? stats[1] + 1.0 : memory, step;
    DIV(step, value - stats[0], weight);
    stats[0] += step;
    stats[1] = weight;
    return OK;
}

/* online.update_line's arithmetic on a component's sums (``found`` 0: a new line). */
static inline int
update_line_of(double *sums, int found, double size, double value, double memory)
{
    if (!found) {
        sums[0] = 1.0;
        sums[1] = size;
        sums[2] = size * size;
        sums[3] = value;
        sums[4] = size * value;
        sums[5] = START_SPREAD;
        return OK;
    }
    double weight = sums[0], spread = sums[5], fitted, decay, added;
    CHECK(on_line_of(sums, size, &fitted));
    double limit = HUBER_K * (0.02 > spread ? 0.02 : spread);
    double deviation = value - fitted;
    double clipped = deviation < -limit ? -limit : (deviation > limit ? limit : deviation);
    value = fitted + clipped;
    if (weight + 1.0 <= memory) {
        decay = 1.0;
    }
    else {
        DIV(decay, memory - 1.0, weight);
    }
    sums[0] = decay * weight + 1.0;
    sums[1] = decay * sums[1] + size;
    sums[2] = decay * sums[2] + size * size;
    sums[3] = decay * sums[3] + value;
    sums[4] = decay * sums[4] + size * value;
    DIV(added, fabs(clipped) - spread, sums[0]);
    sums[5] = spread + added;
    return OK;
}

/* ``values`` (n of them) into ``list`` (an exact list of n) or, where list is NULL, into a new
 * list stored under ``key`` in ``dict``. */
static int
store(PyObject *dict, PyObject *key, PyObject *list, const double *values, Py_ssize_t n)
{
    if (list != NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *v = PyFloat_FromDouble(values[i]);
            if (v == NULL) {
                return ERROR;
            }
            PyList_SetItem(list, i, v); /* steals; list checked exact, i in range */
        }
        return PyDict_SetItem(dict, key, list) < 0 ? ERROR : OK;
    }
    PyObject *made = list_of(values, n);
    if (made == NULL) {
        return ERROR;
    }
    int failed = PyDict_SetItem(dict, key, made) < 0;
    Py_DECREF(made);
    return failed ? ERROR : OK;
}

static int
compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* What learn works out for one phase before writing it. */
typedef struct {
    Keys keys;
    PyObject *keys_obj; /* the PhaseKeys (borrowed) */
    double ratio, expected_ratio; /* log(observed / base), log(expected / base) */
    int speed_phase;
    int corrected; /* expected != base: the spreads learn from it */
    PyObject *error_list, *sums_list;
    int family_found;
    double error[2], sums[6], family[3];
} Learning_phase;

/* One phase's writes: its component's error and line, then its exact shape's statistic
 * (online.learn_beyond_device). families.pop(family) then families[family] = update(...): the
 * newest last. An earlier phase's new family may have pushed this one out (the oldest goes):
 * then it starts anew, as the rule's pop would find nothing. */
static int
learn_phase(const Learning *learned, const Learning_phase *p, double left)
{
    if (p->corrected) {
        CHECK(store(learned->error, p->keys.component, p->error_list, p->error, 2));
    }
    CHECK(store(learned->components, p->keys.component, p->sums_list, p->sums, 6));
    PyObject *family = PyDict_GetItemWithError(learned->families, p->keys.family);
    if (family == NULL && PyErr_Occurred()) {
        return ERROR;
    }
    Py_XINCREF(family);
    if (family != NULL && PyDict_DelItem(learned->families, p->keys.family) < 0) {
        Py_DECREF(family);
        return ERROR;
    }
    double fresh[3];
    if (family == NULL) {
        update_stats(fresh, 0, left, MEMORY_FAMILY);
    }
    int status = store(learned->families, p->keys.family, family,
                       family == NULL ? fresh : p->family, 3);
    Py_XDECREF(family);
    CHECK(status);
    if (PyDict_GET_SIZE(learned->families) > MAX_FAMILIES) {
        Py_ssize_t at = 0;
        PyObject *oldest, *value;
        if (PyDict_Next(learned->families, &at, &oldest, &value)) {
            Py_INCREF(oldest);
            int failed = PyDict_DelItem(learned->families, oldest) < 0;
            Py_DECREF(oldest);
            if (failed) {
                return ERROR;
            }
        }
    }
    return OK;
}

/* telemetry.eta.online.learn(learned, observations, warmup_key, warmup_ratio), or FALLBACK
 * before any write. */
static int
learn_from(PyObject *learned_obj, PyObject *observations, PyObject *warmup_key,
           PyObject *warmup_ratio_obj)
{
    Learning learned;
    CHECK(learning_of(learned_obj, &learned));
    if (!PyList_CheckExact(observations) || PyList_GET_SIZE(observations) > MAX_PHASES) {
        return FALLBACK;
    }
    int64_t jobs;
    CHECK(read_int(AT(learned_obj, off_jobs), &jobs));
    Learning_phase phase[MAX_PHASES];
    double ratios[MAX_PHASES];
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(observations); i++) {
        PyObject *o = PyList_GET_ITEM(observations, i);
        double base, expected, observed;
        if (Py_TYPE(o) != Observation_Type) {
            return FALLBACK;
        }
        PyObject *name = AT(o, off_obs_phase);
        CHECK(read_float(AT(o, off_obs_base), &base));
        CHECK(read_float(AT(o, off_obs_expected), &expected));
        CHECK(read_float(AT(o, off_obs_observed), &observed));
        if (!(observed > 0 && base > 0 && expected > 0)) {
            continue;
        }
        Learning_phase *p = &phase[n];
        if (name == NULL || !PyUnicode_CheckExact(name)) {
            return FALLBACK;
        }
        p->keys_obj = AT(o, off_obs_keys);
        CHECK(keys_of(p->keys_obj, &p->keys));
        CHECK(math_log(observed / base, &p->ratio));
        if (isnan(p->ratio)) { /* the median's sort of a NaN is Python's */
            return FALLBACK;
        }
        p->ratio = clamp_ratio(p->ratio);
        CHECK(math_log(expected / base, &p->expected_ratio));
        p->corrected = expected != base;
        int contains = PySet_Contains(speed_phases, name);
        if (contains < 0) {
            return ERROR;
        }
        p->speed_phase = contains;
        for (Py_ssize_t j = 0; j < n; j++) { /* a statistic twice: the rule's order of updates */
            if (same_str(p->keys.component, phase[j].keys.component) ||
                same_str(p->keys.family, phase[j].keys.family)) {
                return FALLBACK;
            }
        }
        CHECK(stats_get(learned.error, p->keys.component, 2, &p->error_list, p->error));
        CHECK(stats_get(learned.components, p->keys.component, 6, &p->sums_list, p->sums));
        PyObject *family_list;
        CHECK(stats_get(learned.families, p->keys.family, 3, &family_list, p->family));
        p->family_found = family_list != NULL;
        ratios[n++] = p->ratio;
    }
    if (n == 0) {
        return OK;
    }
    /* The device level: the median of the job's ratios. */
    PyObject *device = phase[0].keys.device, *level_list, *shared_list;
    double level[3], shared[2], sorted[MAX_PHASES], median;
    memcpy(sorted, ratios, (size_t)n * sizeof(double));
    qsort(sorted, (size_t)n, sizeof(double), compare_doubles);
    median = n % 2 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
    CHECK(stats_get(learned.levels, device, 3, &level_list, level));
    CHECK(update_stats(level, level_list != NULL, median, MEMORY_DEVICE));
    double speed = level[0];
    /* What the speed phases' errors share. */
    Py_ssize_t misses = 0;
    double total = 0.0, square = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (phase[i].speed_phase && phase[i].corrected) {
            double miss = phase[i].ratio - phase[i].expected_ratio;
            total += miss;
            square += miss * miss;
            misses++;
        }
    }
    int has_shared = misses > 1;
    if (has_shared) {
        double pairs = (double)(misses * (misses - 1)) / 2, product;
        DIV(product, (total * total - square) / 2, pairs);
        CHECK(stats_get(learned.shared, device, 2, &shared_list, shared));
        CHECK(mean_into(shared, shared_list != NULL, product, MEMORY_DEVICE * 2));
    }
    /* Each phase's component error, line and family. */
    double lefts[MAX_PHASES];
    for (Py_ssize_t i = 0; i < n; i++) {
        Learning_phase *p = &phase[i];
        double fitted;
        if (p->corrected) {
            CHECK(mean_into(p->error, p->error_list != NULL,
                            fabs(p->ratio - p->expected_ratio), MEMORY_COMPONENT));
        }
        lefts[i] = p->ratio - speed;
        CHECK(update_line_of(p->sums, p->sums_list != NULL, p->keys.size, lefts[i],
                             MEMORY_COMPONENT));
        CHECK(on_line_of(p->sums, p->keys.size, &fitted));
        lefts[i] -= fitted;
        CHECK(update_stats(p->family, p->family_found, lefts[i], MEMORY_FAMILY));
    }
    /* The warm-up. */
    double warmup[3], warmup_ratio = 0.0;
    PyObject *warmup_list = NULL;
    int has_warmup = 0;
    if (warmup_key != Py_None && warmup_ratio_obj != Py_None) {
        CHECK(read_float(warmup_ratio_obj, &warmup_ratio));
        if (warmup_ratio > 0) {
            double value;
            if (!PyUnicode_CheckExact(warmup_key)) {
                return FALLBACK;
            }
            CHECK(math_log(warmup_ratio, &value));
            CHECK(stats_get(learned.warmup, warmup_key, 3, &warmup_list, warmup));
            CHECK(update_stats(warmup, warmup_list != NULL, clamp_ratio(value),
                               MEMORY_COMPONENT));
            has_warmup = 1;
        }
    }
    /* The writes, in the rule's order (from here only a lack of memory stops them). What they
     * use is held first: an allocation below may start a collection, whose finalisers could
     * change what was read. */
    PyObject *held[8 + 3 * MAX_PHASES];
    Py_ssize_t n_held = 0;
#define HOLD(o)                                                                                \
    do {                                                                                       \
        if ((o) != NULL) {                                                                     \
            Py_INCREF(o);                                                                      \
            held[n_held++] = (o);                                                              \
        }                                                                                      \
    } while (0)
    HOLD(learned.levels);
    HOLD(learned.shared);
    HOLD(learned.error);
    HOLD(learned.components);
    HOLD(learned.families);
    HOLD(learned.warmup);
    HOLD(level_list);
    HOLD(has_shared ? shared_list : NULL);
    HOLD(has_warmup ? warmup_list : NULL);
    for (Py_ssize_t i = 0; i < n; i++) {
        HOLD(phase[i].keys_obj);
        HOLD(phase[i].corrected ? phase[i].error_list : NULL);
        HOLD(phase[i].sums_list);
    }
#undef HOLD
    int status = store(learned.levels, device, level_list, level, 3);
    if (status == OK && has_shared) {
        status = store(learned.shared, device, shared_list, shared, 2);
    }
    for (Py_ssize_t i = 0; status == OK && i < n; i++) {
        status = learn_phase(&learned, &phase[i], lefts[i]);
    }
    if (status == OK && has_warmup) {
        status = store(learned.warmup, warmup_key, warmup_list, warmup, 3);
    }
    if (status == OK) {
        status = write_int(learned_obj, off_jobs, jobs + 1);
    }
    for (Py_ssize_t k = 0; k < n_held; k++) {
        Py_DECREF(held[k]);
    }
    return status;
}

static PyObject *
call_rule(PyObject *module, PyObject *name, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *rule = PyObject_GetAttr(module, name);
    if (rule == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Vectorcall(rule, args, nargs, NULL);
    Py_DECREF(rule);
    return result;
}

/* Whether a twin was called with ``wanted`` arguments (else a TypeError naming its ``usage``). */
static int
arity(Py_ssize_t nargs, Py_ssize_t wanted, const char *usage)
{
    if (nargs == wanted) {
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", usage, wanted);
    return -1;
}

/* How a twin's call ends, by the ``status`` of its C: its ``result`` (NULL where it has none:
 * None); NULL where a Python error is set; else the rule, called with the same arguments —
 * ``name`` looked up on ``owner`` at each fallback (rare: odd input only) or, where ``owner``
 * is NULL, the method ``name`` of ``args[0]``. */
static PyObject *
ended(int status, PyObject *result, PyObject *owner, PyObject *name, PyObject *const *args,
      Py_ssize_t nargs)
{
    if (status == OK) {
        if (result != NULL) {
            return result;
        }
        Py_RETURN_NONE;
    }
    if (status == ERROR) {
        return NULL;
    }
    if (owner == NULL) {
        return PyObject_VectorcallMethod(name, args, (size_t)nargs, NULL);
    }
    return call_rule(owner, name, args, nargs);
}

static PyObject *
live_corrected(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (arity(nargs, 4, "corrected(prior, learned, steps, tau)") < 0 ||
        (online_module == NULL && online_setup() < 0)) {
        return NULL;
    }
    PyObject *result = NULL;
    int status = correct(args[0], args[1], args[2], args[3], &result);
    return ended(status, result, live_module, str_corrected, args, 4);
}

static PyObject *
live_learn(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (arity(nargs, 4, "learn(learned, observations, warmup_key, warmup_ratio)") < 0 ||
        (online_module == NULL && online_setup() < 0)) {
        return NULL;
    }
    int status = learn_from(args[0], args[1], args[2], args[3]);
    return ended(status, NULL, online_module, str_learn, args, 4);
}

/* -- counting scored ETAs ---------------------------------------------------------------------- */

/* add_all(histogram, errors, covered) is telemetry.projections.eta.Histogram.add_all (the rule:
 * each error into the bucket of the first edge it does not exceed, the totals, the covered
 * count), falling back to it for anything but a list of floats into a Histogram whose counts
 * are small ints. */
static PyTypeObject *Histogram_Type;
static PyObject *str_add_all;
static double error_edges[16];
static Py_ssize_t n_error_edges;
static Py_ssize_t off_hist_counts, off_hist_total, off_hist_sum, off_hist_sum_abs,
    off_hist_covered;

static int
histogram_setup(void)
{
    if (eta_projection == NULL && score_setup() < 0) {
        return -1;
    }
    PyObject *type = PyObject_GetAttrString(eta_projection, "Histogram");
    PyObject *edges = PyObject_GetAttrString(eta_projection, "ERROR_EDGES");
    int status = -1;
    if (type == NULL || edges == NULL) {
        goto done;
    }
    if (!PyType_Check(type) || !PyTuple_CheckExact(edges) || PyTuple_GET_SIZE(edges) > 16 ||
        PyTuple_GET_SIZE(edges) == 0) {
        PyErr_SetString(PyExc_ImportError, "unexpected Histogram or ERROR_EDGES");
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(edges); i++) {
        error_edges[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(edges, i));
        if (error_edges[i] == -1.0 && PyErr_Occurred()) {
            goto done;
        }
    }
    static const SlotRef histogram_slots[] = {
        {"counts", &off_hist_counts}, {"total", &off_hist_total}, {"sum", &off_hist_sum},
        {"sum_abs", &off_hist_sum_abs}, {"covered", &off_hist_covered},
    };
    if (slots_in((PyTypeObject *)type, histogram_slots, COUNT(histogram_slots)) < 0) {
        goto done;
    }
    str_add_all = PyUnicode_InternFromString("add_all");
    if (str_add_all == NULL) {
        goto done;
    }
    n_error_edges = PyTuple_GET_SIZE(edges);
    Histogram_Type = (PyTypeObject *)type;
    type = NULL;
    status = 0;
done:
    Py_XDECREF(type);
    Py_XDECREF(edges);
    return status;
}

/* An int or a bool (what ``covered`` may be), as a C integer. */
static inline int
read_count(PyObject *v, int64_t *out)
{
    if (v == Py_True || v == Py_False) {
        *out = v == Py_True;
        return OK;
    }
    return read_int(v, out);
}

/* Histogram.add_all(histogram, errors, covered), or FALLBACK before any write. */
static int
count_into(PyObject *histogram, PyObject *errors, PyObject *covered_obj)
{
    if (Py_TYPE(histogram) != Histogram_Type || !PyList_CheckExact(errors)) {
        return FALLBACK;
    }
    Py_ssize_t n = PyList_GET_SIZE(errors);
    if (n == 0) {
        return OK;
    }
    PyObject *counts = AT(histogram, off_hist_counts);
    int64_t total, covered, added, slots[17];
    double sum, sum_abs;
    Py_ssize_t n_slots = n_error_edges + 1;
    if (counts == NULL || !PyList_CheckExact(counts) ||
        (PyList_GET_SIZE(counts) != 0 && PyList_GET_SIZE(counts) != n_slots)) {
        return FALLBACK;
    }
    int fresh = PyList_GET_SIZE(counts) == 0;
    for (Py_ssize_t i = 0; i < n_slots; i++) {
        slots[i] = 0;
        if (!fresh) {
            CHECK(read_int(PyList_GET_ITEM(counts, i), &slots[i]));
        }
    }
    CHECK(read_int(AT(histogram, off_hist_total), &total));
    CHECK(read_float(AT(histogram, off_hist_sum), &sum));
    CHECK(read_float(AT(histogram, off_hist_sum_abs), &sum_abs));
    CHECK(read_int(AT(histogram, off_hist_covered), &covered));
    CHECK(read_count(covered_obj, &added));
    /* The errors read before anything is allocated (a collection could run a finaliser). */
    double values[STACK_POINTS];
    if (n > STACK_POINTS || added > ((int64_t)1 << 40) || added < -((int64_t)1 << 40)) {
        return FALLBACK;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        CHECK(read_float(PyList_GET_ITEM(errors, i), &values[i]));
    }
    /* The writes: the counts (a new list where there was none), then the totals. */
    if (fresh) {
        counts = PyList_New(n_slots);
        if (counts == NULL) {
            return ERROR;
        }
        for (Py_ssize_t i = 0; i < n_slots; i++) {
            PyObject *zero = PyLong_FromLong(0);
            if (zero == NULL) {
                Py_DECREF(counts);
                return ERROR;
            }
            PyList_SET_ITEM(counts, i, zero);
        }
        write_slot(histogram, off_hist_counts, counts);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        double error = values[i];
        Py_ssize_t slot = n_error_edges; /* beyond every edge, NaN too */
        if (error <= error_edges[n_error_edges - 1]) {
            slot = 0;
            while (error_edges[slot] < error) { /* bisect_left */
                slot++;
            }
        }
        slots[slot]++;
        sum += error;
        sum_abs += fabs(error);
    }
    for (Py_ssize_t i = 0; i < n_slots; i++) {
        PyObject *v = PyLong_FromLongLong(slots[i]);
        if (v == NULL) {
            return ERROR;
        }
        PyList_SetItem(counts, i, v); /* steals */
    }
    CHECK(write_int(histogram, off_hist_total, total + n));
    CHECK(write_float(histogram, off_hist_sum, sum));
    CHECK(write_float(histogram, off_hist_sum_abs, sum_abs));
    return write_int(histogram, off_hist_covered, covered + added);
}

static PyObject *
live_add_all(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (arity(nargs, 3, "add_all(histogram, errors, covered)") < 0 ||
        (Histogram_Type == NULL && histogram_setup() < 0)) {
        return NULL;
    }
    int status = count_into(args[0], args[1], args[2]);
    return ended(status, NULL, NULL, str_add_all, args, 3);
}

/* -- issuing an ETA ----------------------------------------------------------------------------- */

/* issue(running, ts) is telemetry.projections.eta._issue(running, ts, estimate_fields) with this
 * module's estimate_fields: the running job's ETA at ts, appended to its issued list as an
 * EtaPoint. Anything but a RunningEta holding a LiveJob and a list, or an estimate the C hands
 * over, goes to the rule (which calls this module's estimate_fields, and so the method). */
static PyTypeObject *RunningEta_Type;
static PyObject *point_names, *str_issue_rule;
static Py_ssize_t off_running_live, off_running_issued;

static int
issue_setup(void)
{
    if (eta_projection == NULL && score_setup() < 0) {
        return -1;
    }
    PyObject *type = PyObject_GetAttrString(eta_projection, "RunningEta");
    if (type == NULL) {
        return -1;
    }
    static const SlotRef running_slots[] = {
        {"live", &off_running_live}, {"issued", &off_running_issued},
    };
    if (!PyType_Check(type) ||
        slots_in((PyTypeObject *)type, running_slots, COUNT(running_slots)) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ImportError, "telemetry.projections.eta.RunningEta");
        }
        Py_DECREF(type);
        return -1;
    }
    point_names = Py_BuildValue("(ssssss)", "ts", "remaining_s", "p10_s", "p90_s", "progress",
                                "estimating");
    str_issue_rule = PyUnicode_InternFromString("_issue");
    if (point_names == NULL || str_issue_rule == NULL) {
        Py_DECREF(type);
        return -1;
    }
    RunningEta_Type = (PyTypeObject *)type;
    return 0;
}

static PyObject *
live_issue(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (arity(nargs, 2, "issue(running, ts)") < 0 ||
        (RunningEta_Type == NULL && issue_setup() < 0)) {
        return NULL;
    }
    PyObject *running = args[0], *ts = args[1];
    if (Py_TYPE(running) == RunningEta_Type) {
        PyObject *live = AT(running, off_running_live);
        PyObject *issued = AT(running, off_running_issued);
        PyObject *fields = NULL;
        int status = FALLBACK;
        if (live != NULL && Py_TYPE(live) == LiveJob_Type && issued != NULL &&
            PyList_CheckExact(issued)) {
            status = estimate(live, ts, &fields);
        }
        if (status == ERROR) {
            return NULL;
        }
        if (status == OK) {
            PyObject *values[6] = {ts, PyTuple_GET_ITEM(fields, 0), PyTuple_GET_ITEM(fields, 1),
                                   PyTuple_GET_ITEM(fields, 2), PyTuple_GET_ITEM(fields, 3),
                                   PyTuple_GET_ITEM(fields, 4)};
            PyObject *point = PyObject_Vectorcall((PyObject *)EtaPoint_Type, values, 0,
                                                  point_names);
            Py_DECREF(fields);
            if (point == NULL) {
                return NULL;
            }
            int failed = PyList_Append(issued, point);
            Py_DECREF(point);
            if (failed) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
    }
    /* The rule, with this module's estimate_fields (which hands odd estimators to the method). */
    PyObject *estimate_fields = PyObject_GetAttr(module, str_estimate_fields);
    if (estimate_fields == NULL) {
        return NULL;
    }
    PyObject *call[3] = {running, ts, estimate_fields};
    PyObject *result = call_rule(eta_projection, str_issue_rule, call, 3);
    Py_DECREF(estimate_fields);
    return result;
}

/* -- the module ------------------------------------------------------------------------------- */

static PyObject *
live_step_ended(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (arity(nargs, 5, "step_ended(live, total_steps, duration_s, expert, ts)") < 0) {
        return NULL;
    }
    int status = Py_TYPE(args[0]) == LiveJob_Type
                     ? step(args[0], args[1], args[2], args[3], args[4])
                     : FALLBACK;
    return ended(status, NULL, NULL, str_step_ended, args, 5);
}

static PyObject *
live_estimate_fields(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (arity(nargs, 2, "estimate_fields(live, now)") < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    int status = Py_TYPE(args[0]) == LiveJob_Type ? estimate(args[0], args[1], &result)
                                                  : FALLBACK;
    return ended(status, result, NULL, str_estimate_fields, args, 2);
}

static PyObject *
live_score_issued(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (arity(nargs, 2, "score_issued(issued, end_ts)") < 0 ||
        (eta_projection == NULL && score_setup() < 0)) {
        return NULL;
    }
    PyObject *result = NULL;
    int status = score(args[0], args[1], &result);
    return ended(status, result, eta_projection, str_score_issued, args, 2);
}

static PyMethodDef methods[] = {
    {"step_ended", (PyCFunction)(void (*)(void))live_step_ended, METH_FASTCALL,
     "step_ended(live, total_steps, duration_s, expert, ts): "
     "LiveJob.step_ended(live, total_steps, duration_s, expert, ts)"},
    {"estimate_fields", (PyCFunction)(void (*)(void))live_estimate_fields, METH_FASTCALL,
     "estimate_fields(live, now): LiveJob.estimate_fields(live, now)"},
    {"score_issued", (PyCFunction)(void (*)(void))live_score_issued, METH_FASTCALL,
     "score_issued(issued, end_ts): telemetry.projections.eta.score_issued(issued, end_ts)"},
    {"issue", (PyCFunction)(void (*)(void))live_issue, METH_FASTCALL,
     "issue(running, ts): telemetry.projections.eta._issue(running, ts, estimate_fields)"},
    {"corrected", (PyCFunction)(void (*)(void))live_corrected, METH_FASTCALL,
     "corrected(prior, learned, steps, tau): telemetry.eta.live.corrected(...)"},
    {"add_all", (PyCFunction)(void (*)(void))live_add_all, METH_FASTCALL,
     "add_all(histogram, errors, covered): "
     "telemetry.projections.eta.Histogram.add_all(histogram, errors, covered)"},
    {"learn", (PyCFunction)(void (*)(void))live_learn, METH_FASTCALL,
     "learn(learned, observations, warmup_key, warmup_ratio): "
     "telemetry.eta.online.learn(...)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "telemetry.eta._live",
    "The live ETA estimator's hot paths (telemetry.eta.live.LiveJob's step_ended and "
    "estimate_fields), in C.",
    -1, methods, NULL, NULL, NULL, NULL,
};

static int
constant(PyObject *module, const char *name, double *out)
{
    PyObject *v = PyObject_GetAttrString(module, name);
    if (v == NULL) {
        return -1;
    }
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* A field's slot offset, from the type's member descriptor (checked to be one). */
static int
offset_in(PyTypeObject *type, const char *name, Py_ssize_t *out)
{
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name);
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_ImportError, "%s.%s is not a slot", type->tp_name, name);
        return -1;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != T_OBJECT_EX || member->offset <= 0 ||
        member->offset + (Py_ssize_t)sizeof(PyObject *) > type->tp_basicsize) {
        PyErr_Format(PyExc_ImportError, "%s.%s is not an object slot", type->tp_name, name);
        return -1;
    }
    *out = member->offset;
    return 0;
}

static int
offset_of(const char *name, Py_ssize_t *out)
{
    return offset_in(LiveJob_Type, name, out);
}

PyMODINIT_FUNC
PyInit__live(void)
{
    PyObject *live = NULL, *model = NULL, *online = NULL, *edges = NULL, *rounds = NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    live = PyImport_ImportModule("telemetry.eta.live");
    model = PyImport_ImportModule("telemetry.eta.model");
    online = PyImport_ImportModule("telemetry.eta.online");
    if (live == NULL || model == NULL || online == NULL) {
        goto error;
    }
    LiveJob_Type = (PyTypeObject *)PyObject_GetAttrString(live, "LiveJob");
    if (LiveJob_Type == NULL || !PyType_Check(LiveJob_Type)) {
        goto error;
    }
#define OFFSET(name)                                                                           \
    if (offset_of(#name, &off_##name) < 0) {                                                   \
        goto error;                                                                            \
    }
    FIELDS(OFFSET)
#undef OFFSET
    static const ConstantRef live_constants[] = {
        {"PRIOR_STEPS", &PRIOR_STEPS}, {"WARMUP_WEIGHT", &WARMUP_WEIGHT}, {"Z90", &Z90},
        {"MIN_SPEED_PHASE_S", &MIN_SPEED_PHASE_S}, {"PHASE_TIME_NOISE", &PHASE_TIME_NOISE},
        {"STEP_NOISE", &STEP_NOISE},
        {"SPEED_HUBER", &SPEED_HUBER}, {"SURPRISE", &SURPRISE},
        {"PRIOR_PIECES", &PRIOR_PIECES}, {"PIECE_PRIOR_VARIANCE", &PIECE_PRIOR_VARIANCE},
    };
    if (constants_in(live, live_constants, COUNT(live_constants)) < 0 ||
        constant(online, "RATIO_LIMIT", &RATIO_LIMIT) < 0) {
        goto error;
    }
    rounds = PyObject_GetAttrString(live, "SPEED_ROUNDS");
    if (rounds == NULL || (SPEED_ROUNDS = PyLong_AsLong(rounds)) < 0) {
        goto error;
    }
    speed_phases = PyObject_GetAttrString(online, "SPEED_PHASES");
    buckets = PyObject_GetAttrString(model, "BUCKETS");
    edges = PyObject_GetAttrString(model, "_BUCKET_EDGES");
    if (speed_phases == NULL || buckets == NULL || edges == NULL ||
        !PyFrozenSet_CheckExact(speed_phases) || !PyTuple_CheckExact(buckets) ||
        !PyTuple_CheckExact(edges) || PyTuple_GET_SIZE(edges) > 8 ||
        PyTuple_GET_SIZE(buckets) != PyTuple_GET_SIZE(edges) + 1) {
        PyErr_SetString(PyExc_ImportError, "unexpected SPEED_PHASES, BUCKETS or _BUCKET_EDGES");
        goto error;
    }
    n_bucket_edges = PyTuple_GET_SIZE(edges);
    for (Py_ssize_t i = 0; i < n_bucket_edges; i++) {
        bucket_edges[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(edges, i));
        if (bucket_edges[i] == -1.0 && PyErr_Occurred()) {
            goto error;
        }
    }
    str_denoise = PyUnicode_InternFromString("denoise");
    str_step_ended = PyUnicode_InternFromString("step_ended");
    str_estimate_fields = PyUnicode_InternFromString("estimate_fields");
    str_score_issued = PyUnicode_InternFromString("score_issued");
    if (str_denoise == NULL || str_step_ended == NULL || str_estimate_fields == NULL ||
        str_score_issued == NULL) {
        goto error;
    }
    Py_DECREF(live);
    Py_DECREF(model);
    Py_DECREF(online);
    Py_DECREF(edges);
    Py_DECREF(rounds);
    return module;
error:
    Py_XDECREF(live);
    Py_XDECREF(model);
    Py_XDECREF(online);
    Py_XDECREF(edges);
    Py_XDECREF(rounds);
    Py_DECREF(module);
    return NULL;
}
