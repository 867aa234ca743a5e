/* telemetry.log._natswire: the lean NATS reader's frame scan, in C.
 *
 * scan_frames(buf, pos) is telemetry.log.nats_wire.scan_frames_py, the reference, rule for
 * rule: the MSG/HMSG frames of buf from pos, each (sid, reply or None, header block or None,
 * payload), and the offset after the last; it stops at anything else (another operation, a
 * frame not all there, a malformed line). A contract test holds the two to equal results on
 * random and real buffers, cut at every byte.
 *
 * Why C: a catch-up read takes a few thousand messages from each recv(); cutting them apart in
 * Python (find, split, int, four slices a message) cost ~1 µs a message, as much as decoding
 * the event it carries.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_TOKENS 6
#define MAX_DIGITS 18 /* beyond: larger than any buffer, so never whole (as in Python) */

/* bytes.split()'s whitespace: space, \t, \n, \v, \f, \r. */
static inline int
is_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

/* Split [p, e) at whitespace into at most MAX_TOKENS tokens; returns how many there are
 * (MAX_TOKENS + 1 meaning "more"). */
static int
split(const char *p, const char *e, const char **start, Py_ssize_t *len)
{
    int n = 0;
    for (;;) {
        while (p < e && is_space((unsigned char)*p)) {
            p++;
        }
        if (p >= e) {
            return n;
        }
        if (n == MAX_TOKENS) {
            return n + 1;
        }
        start[n] = p;
        while (p < e && !is_space((unsigned char)*p)) {
            p++;
        }
        len[n] = p - start[n];
        n++;
    }
}

/* A token of ASCII digits as a size: 0 on success; -1 if it is not all digits; -2 if it is too
 * large for any buffer (leading zeros do not count). */
static int
size_of(const char *s, Py_ssize_t n, Py_ssize_t *out)
{
    Py_ssize_t value = 0;
    int digits = 0;
    int too_large = 0;
    if (n == 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < '0' || c > '9') {
            return -1;
        }
        if (digits > 0 || c != '0') {
            if (++digits > MAX_DIGITS) {
                too_large = 1;
            }
            else {
                value = value * 10 + (c - '0');
            }
        }
    }
    *out = value;
    return too_large ? -2 : 0;
}

/* The first "\r\n" at or after p, before e; NULL if none. */
static inline const char *
find_crlf(const char *p, const char *e)
{
    while (p < e) {
        const char *r = memchr(p, '\r', (size_t)(e - p));
        if (r == NULL || r + 1 >= e) {
            return NULL;
        }
        if (r[1] == '\n') {
            return r;
        }
        p = r + 1;
    }
    return NULL;
}

static PyObject *
bytes_of(const char *p, Py_ssize_t n)
{
    return PyBytes_FromStringAndSize(p, n);
}

PyDoc_STRVAR(scan_frames_doc,
"scan_frames(buf, pos) -> (frames, next)\n\n"
"The MSG/HMSG frames of buf from pos, as telemetry.log.nats_wire.scan_frames_py.");

static PyObject *
scan_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "scan_frames(buf, pos) takes 2 arguments");
        return NULL;
    }
    PyObject *buf = args[0];
    if (!PyBytes_Check(buf)) {
        PyErr_SetString(PyExc_TypeError, "scan_frames: buf must be bytes");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const char *base = PyBytes_AS_STRING(buf);
    Py_ssize_t size = PyBytes_GET_SIZE(buf);
    if (pos < 0 || pos > size) {
        PyErr_Format(PyExc_ValueError, "offset %zd outside a buffer of %zd bytes", pos, size);
        return NULL;
    }
    const char *end = base + size;
    PyObject *frames = PyList_New(0);
    if (frames == NULL) {
        return NULL;
    }
    const char *start[MAX_TOKENS + 1];
    Py_ssize_t len[MAX_TOKENS + 1];
    for (;;) {
        const char *p = base + pos;
        const char *eol = find_crlf(p, end);
        if (eol == NULL) {
            break;
        }
        int headers;
        const char *line;
        if (end - p >= 5 && memcmp(p, "HMSG ", 5) == 0) {
            headers = 1;
            line = p + 5;
        }
        else if (end - p >= 4 && memcmp(p, "MSG ", 4) == 0) {
            headers = 0;
            line = p + 4;
        }
        else {
            break;
        }
        int n = split(line, eol, start, len);
        int with_reply;
        if (n == 4 + headers) {
            with_reply = 1;
        }
        else if (n == 3 + headers) {
            with_reply = 0;
        }
        else {
            break;
        }
        Py_ssize_t hdr = 0, total;
        int status = size_of(start[n - 1], len[n - 1], &total);
        if (headers) {
            int hdr_status = size_of(start[n - 2], len[n - 2], &hdr);
            if (hdr_status == -1 || status == -1) {
                break;
            }
            if (hdr_status == -2) {
                break; /* larger than total (a bigger total is never whole either) */
            }
        }
        if (status != 0) {
            break; /* not digits, or too large to be whole */
        }
        if (hdr > total) {
            break;
        }
        const char *body = eol + 2;
        if (total > end - body - 2 || body[total] != '\r' || body[total + 1] != '\n') {
            break;
        }
        PyObject *sid = bytes_of(start[1], len[1]);
        PyObject *reply = with_reply ? bytes_of(start[2], len[2]) : Py_NewRef(Py_None);
        PyObject *head = headers ? bytes_of(body, hdr) : Py_NewRef(Py_None);
        PyObject *payload = bytes_of(body + hdr, total - hdr);
        PyObject *frame = NULL;
        if (sid != NULL && reply != NULL && head != NULL && payload != NULL) {
            frame = PyTuple_Pack(4, sid, reply, head, payload);
            if (frame != NULL) {
                /* It holds bytes and None only, which cannot form a cycle: untracked now, as
                 * the collector would untrack it at its first pass, so that the passes a read
                 * of thousands of frames sets off have nothing of it to visit. */
                PyObject_GC_UnTrack(frame);
            }
        }
        Py_XDECREF(sid);
        Py_XDECREF(reply);
        Py_XDECREF(head);
        Py_XDECREF(payload);
        if (frame == NULL || PyList_Append(frames, frame) < 0) {
            Py_XDECREF(frame);
            Py_DECREF(frames);
            return NULL;
        }
        Py_DECREF(frame);
        pos = (body + total + 2) - base;
    }
    PyObject *result = Py_BuildValue("(Nn)", frames, pos);
    return result;
}

static PyMethodDef natswire_methods[] = {
    {"scan_frames", (PyCFunction)(void (*)(void))scan_frames, METH_FASTCALL, scan_frames_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef natswire_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "telemetry.log._natswire",
    .m_doc = "The lean NATS reader's frame scan in C (telemetry.log.nats_wire is the reference).",
    .m_size = -1,
    .m_methods = natswire_methods,
};

PyMODINIT_FUNC
PyInit__natswire(void)
{
    return PyModule_Create(&natswire_module);
}
