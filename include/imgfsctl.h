/* imgfsctl: the administration tool's subcommands, one file per concern
 * (imgfsctl_main.c dispatches; imgfsctl_status.c: status; imgfsctl_repo.c:
 * versions, retire and gc). Each *_main takes the subcommand's own argv
 * (argv[0] is its name) and returns the exit status: 0 success, 1 failure,
 * 2 bad usage. */
#ifndef IMGFS_IMGFSCTL_H
#define IMGFS_IMGFSCTL_H

#include <stdbool.h>
#include <stdio.h>

/* Prints "imgfsctl CMD: MSG (see imgfsctl CMD --help)" and returns 2. */
int usage_error(const char *cmd, const char *msg);
/* True when --help or -h comes before any "--". */
bool wants_help(int argc, char **argv);
/* Parses "ARG [FLAG]", in either order: the one positional argument into
 * *arg, and whether FLAG was given. 0, or 2 after printing the usage error
 * (an unknown option is named). */
int parse_arg_and_flag(const char *cmd, int argc, char **argv, const char *arg_name, const char **arg,
                       const char *flag, bool *flag_set);

int status_main(int argc, char **argv);
void status_help(FILE *out);
int versions_main(int argc, char **argv);
void versions_help(FILE *out);
int retire_main(int argc, char **argv);
void retire_help(FILE *out);
int gc_main(int argc, char **argv);
void gc_help(FILE *out);

#endif
