/* telemetry.log._framing: the reader's check of a run of frames, in C.
 *
 * scan_run(buf, offset, first, schema, limit) is telemetry.log.framing.scan_run_py, the
 * reference, check for check: the same frames taken, the same payload, count and end. A
 * contract test holds the two to equal results on random and damaged buffers.
 *
 * Why C: live emitters write a frame per 50 ms flush, one or two events, and the reader checks
 * every frame (two CRC-32s, position, schema, layout) before decoding a run of them in one
 * msgspec call. In Python those checks cost ~0.5 µs a frame, more than decoding the event.
 * The CRC-32 is zlib-ng's, the function the writer uses, found in the zlib_ng module already
 * loaded (its wheel exports it); where that fails, zlib's crc32: the same checksum, ~10x slower.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <dlfcn.h>
#include <zlib.h>

#define HEADER_SIZE 32
#define HEAD_CRC_FROM 8
#define ENTRY_SIZE 8
#define ARRAY32_SIZE 5  /* 0xdd, then the element count as a big-endian u32 */
#define MSGPACK_ARRAY 1
#define MAGIC 0x014C5457u  /* b"WTL\x01" read as a little-endian u32 */
#define COPY_BELOW 4096  /* a lone frame's payload this small is copied rather than viewed */

static inline uint32_t
le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t
le64(const unsigned char *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

typedef uint32_t (*crc32_function)(uint32_t crc, const unsigned char *data, uint32_t len);
static crc32_function zng_crc32;  /* NULL: use zlib's */

/* zlib-ng's crc32 from the loaded zlib_ng extension, if it can be had; never raises. */
static void
find_zlib_ng(void)
{
    PyObject *module = PyImport_ImportModule("zlib_ng.zlib_ng");
    PyObject *file = module ? PyObject_GetAttrString(module, "__file__") : NULL;
    const char *path = file ? PyUnicode_AsUTF8(file) : NULL;
    if (path != NULL) {
        /* RTLD_NOLOAD: the library Python loaded, not a second copy; it is never unloaded. */
        void *library = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
        if (library != NULL) {
            zng_crc32 = (crc32_function)dlsym(library, "zng_crc32");
        }
    }
    PyErr_Clear();
    Py_XDECREF(file);
    Py_XDECREF(module);
}

/* CRC-32 of len bytes, in pieces the libraries' 32-bit lengths can take. */
static uint32_t
crc_of(const unsigned char *data, Py_ssize_t len)
{
    if (zng_crc32 != NULL) {
        uint32_t crc = 0;
        while (len > 0) {
            uint32_t piece = len > (Py_ssize_t)0x40000000 ? 0x40000000u : (uint32_t)len;
            crc = zng_crc32(crc, data, piece);
            data += piece;
            len -= piece;
        }
        return crc;
    }
    uLong crc = crc32(0L, Z_NULL, 0);
    while (len > 0) {
        uInt piece = len > (Py_ssize_t)0x40000000 ? 0x40000000u : (uInt)len;
        crc = crc32(crc, data, piece);
        data += piece;
        len -= piece;
    }
    return (uint32_t)crc;
}

/* Where each frame's records lie in buf. */
typedef struct {
    Py_ssize_t start, len;
} Piece;

PyDoc_STRVAR(scan_run_doc,
"scan_run(buf, offset, first, schema, limit) -> (payload, count, end) | None\n\n"
"telemetry.log.framing.scan_run_py in C: the run of healthy MessagePack frames in buf from\n"
"offset, as one MessagePack array of their records, how many, and the offset after them.");

static PyObject *
scan_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "scan_run() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    unsigned long long expected = PyLong_AsUnsignedLongLong(args[2]);
    if (expected == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    unsigned long long schema = PyLong_AsUnsignedLongLong(args[3]);
    if (schema == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[4]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "scan_run(): offset must not be negative");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *data = view.buf;
    const Py_ssize_t last = view.len;
    const uint64_t kind = schema | (uint64_t)MSGPACK_ARRAY << 16;  /* as the reference's */
    PyObject *result = NULL, *payload = NULL;
    Py_ssize_t used = 0, size = 16, count = 0, records_len = 0;
    Piece *pieces = PyMem_Malloc((size_t)size * sizeof(Piece));
    if (pieces == NULL) {
        PyErr_NoMemory();
        goto done;
    }

    while (offset <= last - HEADER_SIZE) {
        const unsigned char *head = data + offset;
        uint32_t magic = le32(head), head_crc = le32(head + 4), body_len = le32(head + 8);
        uint32_t n = le32(head + 12), written_as = le32(head + 24), body_crc = le32(head + 28);
        uint64_t at = le64(head + 16);
        Py_ssize_t body = offset + HEADER_SIZE;
        if (magic != MAGIC || at != expected || written_as != kind
                || (Py_ssize_t)body_len > last - body
                || crc_of(head + HEAD_CRC_FROM, HEADER_SIZE - HEAD_CRC_FROM) != head_crc
                || (uint64_t)body_len < (uint64_t)n * ENTRY_SIZE + ARRAY32_SIZE) {
            break;
        }
        if (used > 0 && (uint64_t)count + n > (uint64_t)limit) {
            break;
        }
        if (crc_of(data + body, body_len) != body_crc) {
            break;
        }
        if (used == size) {
            size *= 2;
            Piece *more = PyMem_Realloc(pieces, (size_t)size * sizeof(Piece));
            if (more == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            pieces = more;
        }
        /* The first frame's piece keeps its array header (a lone frame is its own payload). */
        Py_ssize_t skip = (Py_ssize_t)n * ENTRY_SIZE + (used > 0 ? ARRAY32_SIZE : 0);
        pieces[used].start = body + skip;
        pieces[used].len = (Py_ssize_t)body_len - skip;
        records_len += pieces[used].len;
        used++;
        count += n;
        expected += n;
        offset = body + body_len;
    }
    if (used == 0) {
        goto none;
    }
    if (used == 1 && pieces[0].len >= COPY_BELOW) {
        PyObject *whole = PyMemoryView_FromObject(args[0]);
        if (whole == NULL) {
            goto done;
        }
        payload = PySequence_GetSlice(whole, pieces[0].start, pieces[0].start + pieces[0].len);
        Py_DECREF(whole);
    }
    else if (used == 1) {
        payload = PyBytes_FromStringAndSize((const char *)data + pieces[0].start, pieces[0].len);
    }
    else {
        Py_ssize_t first_records = pieces[0].len - ARRAY32_SIZE;
        payload = PyBytes_FromStringAndSize(NULL, records_len);  /* the first piece's header too */
        if (payload != NULL) {
            unsigned char *out = (unsigned char *)PyBytes_AS_STRING(payload);
            out[0] = 0xDD;
            out[1] = (unsigned char)(count >> 24);
            out[2] = (unsigned char)(count >> 16);
            out[3] = (unsigned char)(count >> 8);
            out[4] = (unsigned char)count;
            out += ARRAY32_SIZE;
            memcpy(out, data + pieces[0].start + ARRAY32_SIZE, (size_t)first_records);
            out += first_records;
            for (Py_ssize_t i = 1; i < used; i++) {
                memcpy(out, data + pieces[i].start, (size_t)pieces[i].len);
                out += pieces[i].len;
            }
        }
    }
    if (payload != NULL) {
        result = Py_BuildValue("(Onn)", payload, count, offset);
    }
    goto done;

none:
    result = Py_NewRef(Py_None);

done:
    Py_XDECREF(payload);
    PyMem_Free(pieces);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef framing_methods[] = {
    {"scan_run", (PyCFunction)(void (*)(void))scan_run, METH_FASTCALL, scan_run_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef framing_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "telemetry.log._framing",
    .m_doc = "The reader's check of a run of frames in C (telemetry.log.framing is the reference).",
    .m_size = -1,
    .m_methods = framing_methods,
};

PyMODINIT_FUNC
PyInit__framing(void)
{
    find_zlib_ng();
    PyObject *module = PyModule_Create(&framing_module);
    if (module != NULL
            && PyModule_AddStringConstant(module, "CRC32", zng_crc32 ? "zlib-ng" : "zlib") < 0) {
        Py_CLEAR(module);
    }
    return module;
}
