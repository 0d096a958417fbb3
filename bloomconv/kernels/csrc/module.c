/* bloomconv.kernels._kernels: the 4-bit (fourbit.c), dense (dense.c) and int8 quantization
 * (int8.c) CPU kernels in one extension, so they share one thread pool (parallel.c) and one answer
 * to which instruction sets this CPU runs. Every function takes raw addresses; the Python wrappers in bloomconv/kernels/
 * validate the tensors behind them.
 */
#include "kernels.h"

PyDoc_STRVAR(fourbit_matmul_doc,
"fourbit_matmul(x, batch, out, threads, isa, *matrix) -> None\n\n"
"out (batch, rows) fp32 = x (batch, cols) fp32 @ W.T for the 4-bit matrix W; all tensors contiguous,\n"
"given by address. matrix: packed, rows, cols, block_size, code, absmax, absmax_codes, nested_absmax,\n"
"nested_code, nested_offset, nested_block_size, rounding (pointers as ints, 0 for none).");

PyDoc_STRVAR(fourbit_matmul_bf16_tiles_doc,
"fourbit_matmul_bf16_tiles(x, batch, out, threads, isa, *matrix) -> None\n\n"
"As fourbit_matmul, for 1-64 rows of x and weights rounded to bf16, in bf16 products on AMX tiles\n"
"(x rounded to bf16, fp32 sums); only where amx_bf16_tiles().");

PyDoc_STRVAR(fourbit_matmul_int8_activations_doc,
"fourbit_matmul_int8_activations(x, batch, out, threads, isa, *matrix) -> None\n\n"
"As fourbit_matmul, with x rounded to int8 per 32 columns and the code table to int8 (int32 sums per\n"
"chunk, then fp32); weights in blocks of 32, rows of a multiple of 128; only where AVX512-VNNI.");

PyDoc_STRVAR(fourbit_dequantize_doc,
"fourbit_dequantize(row_ids, count, out, threads, isa, *matrix[, to_bf16]) -> None\n\n"
"out (count, cols) fp32 (bf16 with to_bf16, for weights rounded to bf16) = the 4-bit matrix's rows\n"
"listed in row_ids (int64), given by address.");

PyDoc_STRVAR(fourbit_quantize_doc,
"fourbit_quantize(x, bf16, n, block_size, bounds, order, absmax, packed, threads, isa) -> None\n\n"
"Blockwise 4-bit quantization of n fp32 or bf16 values at address x into absmax (fp32) and\n"
"packed (uint8; 0: absmax only); bounds: 15 fp32 midpoints; order: 16 uint8 or 0. All given by\n"
"address.");

PyDoc_STRVAR(int8_quantize_doc,
"int8_quantize(x, kind, to_fp16, rows, cols, CB, SCB, threads, isa) -> None\n\n"
"LLM.int8() vector-wise quantization of x (rows, cols) fp32 (kind 0), bf16 (1) or fp16 (2), rounded\n"
"to fp16 first if to_fp16: CB (rows, cols) int8 and SCB (rows,) fp32 row absmax, NaN for a row\n"
"holding NaN or inf. All contiguous, given by address.");

PyDoc_STRVAR(dense_matmul_doc,
"dense_matmul(x, batch, out, threads, isa, weight, rows, cols, kind, scale) -> None\n\n"
"out (batch, rows) fp32 = x (batch, cols) fp32 @ W.T [* scale]; W (rows, cols) int8 (kind 0), bf16 (1)\n"
"or fp16 (2); scale (rows,) fp32 or 0. All contiguous, given by address.");

PyDoc_STRVAR(dense_matmul_bf16_tiles_doc,
"dense_matmul_bf16_tiles(x, batch, out, threads, isa, weight, rows, cols, kind, scale) -> None\n\n"
"As dense_matmul, for 1-64 rows of x and int8 or bf16 weights, in bf16 products on AMX tiles (x\n"
"rounded to bf16, fp32 sums); only where amx_bf16_tiles().");

PyDoc_STRVAR(attention_step_doc,
"attention_step(fused, batch, heads, head_size, keys, values, capacity, length, bias, out, threads, isa)\n"
"-> None\n\n"
"One decoding step's attention: each sequence's new key and value, from fused (batch, 3 * heads *\n"
"head_size) fp32 laid out per head as [q, k, v], go into keys and values (batch, heads, capacity,\n"
"head_size) at position length; out (batch, heads * head_size) = softmax(q K^T / sqrt(head_size) +\n"
"bias) V over the length + 1 positions, bias (batch, heads, length + 1). All fp32, contiguous, given\n"
"by address.");

PyDoc_STRVAR(gelu_tanh_doc,
"gelu_tanh(x, out, n, threads, isa) -> None\n\n"
"out = BLOOM's GELU (tanh approximation) of n fp32 values at address x (out may be x).");

PyDoc_STRVAR(argmax_rows_doc,
"argmax_rows(x, rows, n, out, threads, isa) -> None\n\n"
"out (rows,) int64 = each row's index of its largest value (the first; a NaN's if any) in x (rows, n)\n"
"fp32, n > 0. Contiguous, given by address.");

/* Both kernels have code for the same instruction sets and check the CPU alike (kernels.h). */
static PyObject *isas(PyObject *self, PyObject *unused)
{
    if (cpu_has_avx512())
        return Py_BuildValue("(sss)", "avx512", "avx2", "scalar");
    return cpu_has_avx2() ? Py_BuildValue("(ss)", "avx2", "scalar") : Py_BuildValue("(s)", "scalar");
}

static PyObject *amx_bf16_tiles(PyObject *self, PyObject *unused) { return PyBool_FromLong(cpu_has_amx_bf16()); }
static PyObject *bf16_dot_products(PyObject *self, PyObject *unused) { return PyBool_FromLong(cpu_has_bf16_dot()); }
static PyObject *set_helpers_spin(PyObject *self, PyObject *args)
{
    long long nanoseconds;
    if (!PyArg_ParseTuple(args, "L", &nanoseconds))
        return NULL;
    return PyLong_FromLongLong(helpers_spin(nanoseconds));
}

static PyObject *int8_dot_products(PyObject *self, PyObject *unused) { return PyBool_FromLong(cpu_has_avx512_vnni()); }

static PyMethodDef methods[] = {
    {"fourbit_matmul", fourbit_matmul, METH_VARARGS, fourbit_matmul_doc},
    {"fourbit_matmul_bf16_tiles", fourbit_matmul_bf16_tiles, METH_VARARGS, fourbit_matmul_bf16_tiles_doc},
    {"fourbit_matmul_int8_activations", fourbit_matmul_int8_activations, METH_VARARGS,
     fourbit_matmul_int8_activations_doc},
    {"dense_matmul_bf16_tiles", dense_matmul_bf16_tiles, METH_VARARGS, dense_matmul_bf16_tiles_doc},
    {"amx_bf16_tiles", amx_bf16_tiles, METH_NOARGS, "Whether this CPU and OS multiply bf16 AMX tiles."},
    {"fourbit_dequantize", fourbit_dequantize, METH_VARARGS, fourbit_dequantize_doc},
    {"fourbit_quantize", fourbit_quantize, METH_VARARGS, fourbit_quantize_doc},
    {"int8_quantize", int8_quantize, METH_VARARGS, int8_quantize_doc},
    {"dense_matmul", dense_matmul, METH_VARARGS, dense_matmul_doc},
    {"attention_step", attention_step, METH_VARARGS, attention_step_doc},
    {"gelu_tanh", gelu_tanh, METH_VARARGS, gelu_tanh_doc},
    {"argmax_rows", argmax_rows, METH_VARARGS, argmax_rows_doc},
    {"helpers_spin", set_helpers_spin, METH_VARARGS,
     "helpers_spin(nanoseconds) -> the previous setting: how long the thread pool's helpers spin between\n"
     "jobs before they sleep (negative: the default)."},
    {"isas", isas, METH_NOARGS, "The instruction sets this CPU runs, fastest first."},
    {"bf16_dot_products", bf16_dot_products, METH_NOARGS, "Whether this CPU has bf16 dot-product instructions."},
    {"int8_dot_products", int8_dot_products, METH_NOARGS, "Whether this CPU has AVX512-VNNI int8 dot products."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "bloomconv's CPU kernels (see bloomconv/kernels/__init__.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
