/* telemetry.eta._live: the live ETA estimator's two hot paths, and the scoring of a completed
 * job's ETAs, in C.
 *
 * step_ended(live, total_steps, duration_s, expert, ts) is LiveJob.step_ended(...) and
 * estimate_fields(live, now) is LiveJob.estimate_fields(now) (telemetry/eta/live.py, the
 * rule); score_issued(issued, end_ts) is telemetry.projections.eta.score_issued (each ETA's
 * error, coverage and misses, grouped by progress bucket), falling back to it for anything but
 * a list of EtaPoints with int times and float fields. The estimator's twins follow their rule
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
 * lookups and appends per ETA; ~5.5 µs a job in Python, ~0.5 µs here).
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

static double PRIOR_STEPS, WARMUP_WEIGHT, Z90, MIN_SPEED_PHASE_S, STEP_NOISE, SPEED_HUBER,
    SURPRISE, RATIO_LIMIT;
static long SPEED_ROUNDS;

#define FIELDS(X)                                                                              \
    X(start_ts) X(phases) X(expected) X(sigma) X(step_prior) X(warmup) X(speed_tau)            \
    X(speed_weight) X(step_variance) X(offsets) X(done) X(phase) X(phase_start_ts)             \
    X(total_steps) X(steps_done) X(first_step_s) X(later_sum) X(expert) X(segment_sum)         \
    X(segment_n) X(segment_prior) X(segment_observed) X(steps_seen) X(last_step_ts)            \
    X(last_remaining) X(last_ts) X(last_band) X(last_progress) X(speed_key) X(speed_cache)     \
    X(ahead_key) X(evidence_key) X(evidence) X(ahead)

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
surprise(double mean, double shared)
{
    double excess = mean * mean - shared;
    return excess > 0.0 ? SURPRISE * excess : 0.0;
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
        DIV(weights[count], 1.0, own_variance(sigma, shared));
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
    if (constant(eta, "MIN_SCORED_S", &MIN_SCORED_S) < 0 ||
        offset_in((PyTypeObject *)point, "ts", &off_point_ts) < 0 ||
        offset_in((PyTypeObject *)point, "remaining_s", &off_point_remaining_s) < 0 ||
        offset_in((PyTypeObject *)point, "p10_s", &off_point_p10_s) < 0 ||
        offset_in((PyTypeObject *)point, "p90_s", &off_point_p90_s) < 0 ||
        offset_in((PyTypeObject *)point, "progress", &off_point_progress) < 0) {
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

/* -- the module ------------------------------------------------------------------------------- */

static PyObject *
live_step_ended(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "step_ended(live, total_steps, duration_s, expert, ts) takes 5 "
                        "arguments");
        return NULL;
    }
    PyObject *live = args[0];
    if (Py_TYPE(live) == LiveJob_Type) {
        int status = step(live, args[1], args[2], args[3], args[4]);
        if (status == OK) {
            Py_RETURN_NONE;
        }
        if (status == ERROR) {
            return NULL;
        }
    }
    PyObject *call[5] = {live, args[1], args[2], args[3], args[4]};
    return PyObject_VectorcallMethod(str_step_ended, call,
                                     5, NULL);
}

static PyObject *
live_estimate_fields(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "estimate_fields(live, now) takes 2 arguments");
        return NULL;
    }
    PyObject *live = args[0];
    if (Py_TYPE(live) == LiveJob_Type) {
        PyObject *result = NULL;
        int status = estimate(live, args[1], &result);
        if (status == OK) {
            return result;
        }
        if (status == ERROR) {
            return NULL;
        }
    }
    PyObject *call[2] = {live, args[1]};
    return PyObject_VectorcallMethod(str_estimate_fields, call,
                                     2, NULL);
}

static PyObject *
live_score_issued(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "score_issued(issued, end_ts) takes 2 arguments");
        return NULL;
    }
    if (eta_projection == NULL && score_setup() < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    int status = score(args[0], args[1], &result);
    if (status == OK) {
        return result;
    }
    if (status == ERROR) {
        return NULL;
    }
    /* The rule, looked up on each fallback (rare: odd input only). */
    PyObject *rule = PyObject_GetAttr(eta_projection, str_score_issued);
    if (rule == NULL) {
        return NULL;
    }
    PyObject *result_ = PyObject_Vectorcall(rule, args, 2, NULL);
    Py_DECREF(rule);
    return result_;
}

static PyMethodDef methods[] = {
    {"step_ended", (PyCFunction)(void (*)(void))live_step_ended, METH_FASTCALL,
     "step_ended(live, total_steps, duration_s, expert, ts): "
     "LiveJob.step_ended(live, total_steps, duration_s, expert, ts)"},
    {"estimate_fields", (PyCFunction)(void (*)(void))live_estimate_fields, METH_FASTCALL,
     "estimate_fields(live, now): LiveJob.estimate_fields(live, now)"},
    {"score_issued", (PyCFunction)(void (*)(void))live_score_issued, METH_FASTCALL,
     "score_issued(issued, end_ts): telemetry.projections.eta.score_issued(issued, end_ts)"},
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
    if (constant(live, "PRIOR_STEPS", &PRIOR_STEPS) < 0 ||
        constant(live, "WARMUP_WEIGHT", &WARMUP_WEIGHT) < 0 || constant(live, "Z90", &Z90) < 0 ||
        constant(live, "MIN_SPEED_PHASE_S", &MIN_SPEED_PHASE_S) < 0 ||
        constant(live, "STEP_NOISE", &STEP_NOISE) < 0 ||
        constant(live, "SPEED_HUBER", &SPEED_HUBER) < 0 ||
        constant(live, "SURPRISE", &SURPRISE) < 0 ||
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
