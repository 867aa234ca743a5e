/* telemetry._speedups: the engine's pass over every event it applies, in C.
 *
 * fresh_events(events, last_seq, watch) is telemetry.dedup.fresh_events_py, the reference,
 * step for step: the same comparisons in the same order, the same writes to last_seq (so its
 * keys keep the same order), the same exceptions at the same points. A contract test holds the
 * two to equal results on random batches.
 *
 * Why C: in Python this pass loads job, seq and ts through the interpreter's generic attribute
 * lookup (a batch mixes event types, so the per-site caches miss), a quarter of a replay where
 * jobs run side by side. Here each type's slot offsets are looked up once a call, and a field
 * is one load. Anything that is not a plain slot (a property, a custom __getattribute__, an
 * unset slot) goes through PyObject_GetAttr, exactly as Python would.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

static PyObject *name_job, *name_seq, *name_ts;  /* interned attribute names */
static PyObject *minus_one, *zero;

/* What a call learns of one type: where its fields are, how many new events it had, when the
 * first of them came (the counts are returned in that order) and whether it is watched. */
typedef struct {
    PyTypeObject *type;  /* borrowed: the events of this call hold their types */
    Py_ssize_t job, seq, ts;  /* slot offsets, or -1: use PyObject_GetAttr */
    Py_ssize_t count, first_fresh;
    int watched;
} Kind;

static Py_ssize_t
slot_offset(PyTypeObject *type, PyObject *name)
{
    if (type->tp_getattro != PyObject_GenericGetAttr) {
        return -1;
    }
    PyObject *descr = _PyType_Lookup(type, name);  /* borrowed; sets no error */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        return -1;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != T_OBJECT_EX && member->type != T_OBJECT) {
        return -1;
    }
    return member->offset;
}

/* obj.<name> as a new reference: the slot if it is one and set, else the generic lookup. */
static inline PyObject *
field(PyObject *obj, Py_ssize_t offset, PyObject *name)
{
    if (offset >= 0) {
        PyObject *value = *(PyObject **)((char *)obj + offset);
        if (value != NULL) {
            Py_INCREF(value);
            return value;
        }
    }
    return PyObject_GetAttr(obj, name);
}

/* a > b, as Python's ``>``: 1, 0, or -1 with an exception set. Two ints go straight to the
 * int comparison (no conversion to C integers: a timestamp in ns takes three digits). */
static inline int
greater(PyObject *a, PyObject *b)
{
    if (PyLong_CheckExact(a) && PyLong_CheckExact(b)) {
        PyObject *result = PyLong_Type.tp_richcompare(a, b, Py_GT);
        if (result == Py_True || result == Py_False) {
            Py_DECREF(result);
            return result == Py_True;
        }
        Py_XDECREF(result);  /* never: ints always compare */
    }
    return PyObject_RichCompareBool(a, b, Py_GT);
}

/* a != b, as Python's ``!=``: 1, 0, or -1 with an exception set; two strs are compared here. */
static inline int
differ(PyObject *a, PyObject *b)
{
    if (a == b) {
        return 0;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_CheckExact(a) && PyUnicode_CheckExact(b)
            && PyUnicode_IS_READY(a) && PyUnicode_IS_READY(b)) {
#else
    if (PyUnicode_CheckExact(a) && PyUnicode_CheckExact(b)) {
#endif
        Py_ssize_t length = PyUnicode_GET_LENGTH(a);
        int kind = PyUnicode_KIND(a);
        return length != PyUnicode_GET_LENGTH(b) || kind != PyUnicode_KIND(b)
            || memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)(length * kind)) != 0;
    }
    return PyObject_RichCompareBool(a, b, Py_NE);
}

/* The jobs a call has met lately, with their last applied seq held here rather than in last_seq:
 * where jobs alternate event by event, the reference writes and reads last_seq at every event
 * (hashing each event's new job string); here a switch back to a recent job is a string
 * comparison. A job's value is written to last_seq where the reference first adds its key (so
 * the keys keep the reference's order) and otherwise when it leaves the cache or the call ends
 * (updating a key does not move it). Only exact strs are held: any other job goes to last_seq
 * every time, as in the reference. */
#define RECENT 8

typedef struct {
    PyObject *job;  /* strong */
    PyObject *seq;  /* strong: the job's last applied seq (minus_one: none) */
    int in_table;   /* last_seq has the job */
    int dirty;      /* last_seq's value is older than seq */
} Recent;

typedef struct {
    PyObject *table;  /* last_seq, borrowed */
    Recent recent[RECENT];
    int used, evict_next;
} Jobs;

static int
write_back(Jobs *jobs, Recent *entry)
{
    if (!entry->dirty) {
        return 0;
    }
    entry->dirty = 0;
    return PyDict_SetItem(jobs->table, entry->job, entry->seq);
}

/* The reference's ``last_seq[job] = newest`` where a run ends (``entry``: the job's, or NULL). */
static int
end_run(Jobs *jobs, Recent *entry, PyObject *job, PyObject *newest)
{
    if (entry == NULL) {
        return PyDict_SetItem(jobs->table, job, newest);
    }
    Py_SETREF(entry->seq, Py_NewRef(newest));
    if (entry->in_table) {
        entry->dirty = 1;
        return 0;
    }
    entry->in_table = 1;  /* a new key: added now, where the reference adds it */
    return PyDict_SetItem(jobs->table, entry->job, newest);
}

/* The reference's ``last_seq[job]`` (-1 if absent) where a run starts, as a new reference;
 * ``*entry`` is set to the job's entry (NULL if not held). NULL with an exception on error. */
static PyObject *
start_run(Jobs *jobs, PyObject *job, Recent **entry)
{
    *entry = NULL;
    int holdable = PyUnicode_CheckExact(job);
    if (holdable) {
        for (int i = 0; i < jobs->used; i++) {
            if (!differ(jobs->recent[i].job, job)) {  /* two strs: cannot fail */
                *entry = &jobs->recent[i];
                return Py_NewRef(jobs->recent[i].seq);
            }
        }
    }
    PyObject *last = PyDict_GetItemWithError(jobs->table, job);  /* borrowed */
    if (last == NULL && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *seq = last != NULL ? last : minus_one;
    if (holdable) {
        Recent *slot;
        if (jobs->used < RECENT) {
            slot = &jobs->recent[jobs->used++];
        }
        else {
            slot = &jobs->recent[jobs->evict_next];
            jobs->evict_next = (jobs->evict_next + 1) % RECENT;
            if (write_back(jobs, slot) < 0) {
                return NULL;
            }
            Py_DECREF(slot->job);
            Py_DECREF(slot->seq);
        }
        slot->job = Py_NewRef(job);
        slot->seq = Py_NewRef(seq);
        slot->in_table = last != NULL;
        slot->dirty = 0;
        *entry = slot;
    }
    return Py_NewRef(seq);
}

/* Write every held value to last_seq and let go of the entries. A pending exception is kept:
 * the reference has written every run that ended before its error, and so has this. */
static int
release(Jobs *jobs)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    int status = 0;
    for (int i = 0; i < jobs->used; i++) {
        if (status == 0 && write_back(jobs, &jobs->recent[i]) < 0) {
            status = -1;
        }
        Py_DECREF(jobs->recent[i].job);
        Py_DECREF(jobs->recent[i].seq);
    }
    jobs->used = 0;
    if (type != NULL) {
        if (status < 0) {
            PyErr_Clear();
        }
        PyErr_Restore(type, value, traceback);
        return -1;
    }
    return status;
}

/* The entry for ``type``, added (with its offsets and watched flag) if new; NULL on error. */
static Kind *
kind_of(Kind **kinds, Py_ssize_t *used, Py_ssize_t *size, PyTypeObject *type, PyObject *watch)
{
    for (Py_ssize_t i = 0; i < *used; i++) {
        if ((*kinds)[i].type == type) {
            return &(*kinds)[i];
        }
    }
    if (*used == *size) {
        Py_ssize_t grown = *size * 2;
        Kind *more = PyMem_Realloc(*kinds, (size_t)grown * sizeof(Kind));
        if (more == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        *kinds = more;
        *size = grown;
    }
    int watched = PySequence_Contains(watch, (PyObject *)type);
    if (watched < 0) {
        return NULL;
    }
    Kind *kind = &(*kinds)[(*used)++];
    kind->type = type;
    kind->job = slot_offset(type, name_job);
    kind->seq = slot_offset(type, name_seq);
    kind->ts = slot_offset(type, name_ts);
    kind->count = 0;
    kind->first_fresh = 0;
    kind->watched = watched;
    return kind;
}

/* The counts of the types that had new events, in the order their first new event came. */
static PyObject *
counts_by_type(Kind *kinds, Py_ssize_t used)
{
    PyObject *counts = PyDict_New();
    if (counts == NULL) {
        return NULL;
    }
    Py_ssize_t last = -1;  /* first_fresh of the entry added last */
    for (;;) {
        Kind *next = NULL;
        for (Py_ssize_t i = 0; i < used; i++) {
            Kind *kind = &kinds[i];
            if (kind->count > 0 && kind->first_fresh > last
                    && (next == NULL || kind->first_fresh < next->first_fresh)) {
                next = kind;
            }
        }
        if (next == NULL) {
            return counts;
        }
        PyObject *count = PyLong_FromSsize_t(next->count);
        if (count == NULL || PyDict_SetItem(counts, (PyObject *)next->type, count) < 0) {
            Py_XDECREF(count);
            Py_DECREF(counts);
            return NULL;
        }
        Py_DECREF(count);
        last = next->first_fresh;
    }
}

PyDoc_STRVAR(fresh_events_doc,
"fresh_events(events, last_seq, watch) -> (fresh, newest_ts, counts, watched)\n\n"
"telemetry.dedup.fresh_events_py in C: the events whose seq is beyond their job's last one\n"
"in last_seq (a dict, updated), the newest ts among them, how many of each type, and those\n"
"whose type is in watch.");

static PyObject *
fresh_events(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "fresh_events() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *last_seq = args[1], *watch = args[2];
    if (!PyDict_CheckExact(last_seq)) {
        PyErr_SetString(PyExc_TypeError, "fresh_events(): last_seq must be a dict");
        return NULL;
    }
    if (!PySequence_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "fresh_events(): events must be a sequence");
        return NULL;
    }
    /* A tuple of its own (a copy of a list's pointers): whatever Python code a comparison or a
     * property runs, the items stay where they are and alive. */
    PyObject *events = PyTuple_CheckExact(args[0]) ? Py_NewRef(args[0]) : PySequence_Tuple(args[0]);
    if (events == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(events);
    PyObject **items = ((PyTupleObject *)events)->ob_item;

    PyObject *result = NULL, *fresh = NULL, *watched = NULL;
    PyObject *job = NULL;  /* the current run's job: NULL before the first event */
    Jobs jobs = {.table = last_seq, .used = 0, .evict_next = 0};
    Recent *run = NULL;  /* the current run's job's entry, if held */
    PyObject *known = Py_NewRef(minus_one), *newest = Py_NewRef(minus_one);
    PyObject *newest_ts = Py_NewRef(zero);
    Py_ssize_t kinds_size = 16, kinds_used = 0, nfresh = 0;
    Kind *kinds = PyMem_Malloc(kinds_size * sizeof(Kind)), *kind = NULL;
    if (kinds == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Filled in order, then cut to its length: the items past nfresh stay NULL meanwhile. */
    fresh = PyList_New(n);
    watched = PyList_New(0);
    if (fresh == NULL || watched == NULL) {
        goto done;
    }

    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *event = items[i];
        PyTypeObject *type = Py_TYPE(event);
        if (kind == NULL || kind->type != type) {
            kind = kind_of(&kinds, &kinds_used, &kinds_size, type, watch);
            if (kind == NULL) {
                goto done;
            }
        }
        PyObject *event_job = field(event, kind->job, name_job);
        if (event_job == NULL) {
            goto done;
        }
        int switched = 1;
        if (job != NULL) {
            switched = differ(event_job, job);
            if (switched < 0) {
                Py_DECREF(event_job);
                goto done;
            }
        }
        if (switched) {
            if (newest != known && end_run(&jobs, run, job, newest) < 0) {
                Py_DECREF(event_job);
                goto done;
            }
            Py_XSETREF(job, event_job);
            PyObject *last = start_run(&jobs, job, &run);
            if (last == NULL) {
                goto done;
            }
            Py_SETREF(known, Py_NewRef(last));
            Py_SETREF(newest, last);
        }
        else {
            Py_DECREF(event_job);
        }
        PyObject *seq = field(event, kind->seq, name_seq);
        if (seq == NULL) {
            goto done;
        }
        int is_new = greater(seq, newest);
        if (is_new <= 0) {
            Py_DECREF(seq);
            if (is_new < 0) {
                goto done;
            }
            continue;
        }
        Py_SETREF(newest, seq);
        if (kind->count++ == 0) {
            kind->first_fresh = nfresh;
        }
        PyList_SET_ITEM(fresh, nfresh++, Py_NewRef(event));
        if (kind->watched && PyList_Append(watched, event) < 0) {
            goto done;
        }
        PyObject *ts = field(event, kind->ts, name_ts);
        if (ts == NULL) {
            goto done;
        }
        int later = greater(ts, newest_ts);
        if (later < 0) {
            Py_DECREF(ts);
            goto done;
        }
        if (later) {
            Py_SETREF(newest_ts, ts);
        }
        else {
            Py_DECREF(ts);
        }
    }
    if (newest != known && end_run(&jobs, run, job, newest) < 0) {
        goto done;
    }
    if (nfresh < n) {
        PyObject *cut = PyList_GetSlice(fresh, 0, nfresh);
        if (cut == NULL) {
            goto done;
        }
        Py_SETREF(fresh, cut);
    }
    PyObject *counts = counts_by_type(kinds, kinds_used);
    if (counts != NULL) {
        result = PyTuple_Pack(4, fresh, newest_ts, counts, watched);
        Py_DECREF(counts);
    }

done:
    /* Write the held seqs back, on success and on error alike (the reference has written every
     * run that ended before an error); a failed write fails the call. */
    if (release(&jobs) < 0) {
        Py_CLEAR(result);
    }
    PyMem_Free(kinds);
    Py_XDECREF(fresh);  /* a list cut short of n: its NULL items are skipped */
    Py_XDECREF(watched);
    Py_XDECREF(job);
    Py_DECREF(known);
    Py_DECREF(newest);
    Py_DECREF(newest_ts);
    Py_DECREF(events);
    return result;
}

static PyMethodDef speedups_methods[] = {
    {"fresh_events", (PyCFunction)(void (*)(void))fresh_events, METH_FASTCALL,
     fresh_events_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "telemetry._speedups",
    .m_doc = "The engine's per-event pass in C (telemetry.dedup is the contract and reference).",
    .m_size = -1,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    name_job = PyUnicode_InternFromString("job");
    name_seq = PyUnicode_InternFromString("seq");
    name_ts = PyUnicode_InternFromString("ts");
    minus_one = PyLong_FromLong(-1);
    zero = PyLong_FromLong(0);
    if (name_job == NULL || name_seq == NULL || name_ts == NULL || minus_one == NULL
            || zero == NULL) {
        return NULL;
    }
    return PyModule_Create(&speedups_module);
}
