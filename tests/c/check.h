/*
 * The check harness shared by the C test programs: CHECK counts a condition,
 * OK expects an mlart call to succeed, EXPECT_ERROR expects it to fail with a
 * status and a message containing a needle (NULL: any non-empty message).
 * Every failure is printed; g_checks / g_failures give the totals.
 */
#ifndef MLART_TEST_CHECK_H
#define MLART_TEST_CHECK_H

#include "mlart.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_checks = 0;
static int g_failures = 0;

#define CHECK(cond, ...)                                                             \
    do {                                                                             \
        ++g_checks;                                                                  \
        if (!(cond)) {                                                               \
            ++g_failures;                                                            \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                            \
            fputc('\n', stderr);                                                     \
        }                                                                            \
    } while (0)

/* malloc that never returns NULL (exits instead) and never asks for 0 bytes. */
static inline void *xmalloc(size_t bytes) {
    void *p = malloc(bytes == 0 ? 1 : bytes);
    if (p == NULL) {
        fprintf(stderr, "out of host memory (%zu bytes)\n", bytes);
        exit(2);
    }
    return p;
}

/* Consumes `err`; a check that it is NULL (success). Returns 1 on success. */
static inline int ok_(mlart_error *err, const char *call, const char *file, int line) {
    ++g_checks;
    if (err == NULL) {
        return 1;
    }
    ++g_failures;
    fprintf(stderr, "%s:%d: %s failed: [%s] %s\n", file, line, call,
            mlart_status_name(mlart_error_code(err)), mlart_error_message(err));
    mlart_error_free(err);
    return 0;
}
#define OK(call) ok_((call), #call, __FILE__, __LINE__)

/* Consumes `err`; checks its status and that its message contains `needle`
 * (NULL: any message). */
static inline void expect_error_(mlart_error *err, mlart_status status, const char *needle,
                          const char *call, const char *file, int line) {
    ++g_checks;
    if (err == NULL) {
        ++g_failures;
        fprintf(stderr, "%s:%d: %s succeeded but should fail with %s\n", file, line, call,
                mlart_status_name(status));
        return;
    }
    const char *msg = mlart_error_message(err);
    mlart_status got = mlart_error_code(err);
    if (got != status || msg == NULL || msg[0] == '\0' ||
        (needle != NULL && strstr(msg, needle) == NULL)) {
        ++g_failures;
        fprintf(stderr, "%s:%d: %s: expected [%s] containing \"%s\", got [%s] \"%s\"\n", file,
                line, call, mlart_status_name(status), needle ? needle : "", mlart_status_name(got),
                msg ? msg : "(null)");
    }
    mlart_error_free(err);
}
#define EXPECT_ERROR(call, status, needle) \
    expect_error_((call), (status), (needle), #call, __FILE__, __LINE__)

#endif /* MLART_TEST_CHECK_H */
