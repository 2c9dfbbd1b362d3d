/* The libFuzzer entry point every harness defines. Built with clang and
 * -DIMGFS_FUZZ=ON they are libFuzzer targets; otherwise driver.c runs each
 * file of the seed corpus and the regressions through them (ctest fuzz.*). */
#ifndef IMGFS_FUZZ_H
#define IMGFS_FUZZ_H

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#endif
