/* Shared helpers for the guest programs in images/programs/.
 *
 * Every *.c file in this folder is built into /bin/<name> of the initramfs;
 * this header is not a program, it only keeps the programs' argument checks
 * and output format consistent. Define _GNU_SOURCE before including it.
 *
 * Output convention: every machine-readable line is written with ONE write(2)
 * to stdout (and to the optional --log file), so lines from many processes
 * never interleave on the serial console and nothing sits in a stdio buffer
 * that fork() would duplicate.
 */
#ifndef BDPROG_H
#define BDPROG_H

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Exit codes shared by all programs. */
#define BD_EXIT_OK 0
#define BD_EXIT_FAIL 1
#define BD_EXIT_USAGE 2

/* File descriptor of the --log file, or -1. */
static inline int *bd_log_fd_slot(void)
{
	static int fd = -1;
	return &fd;
}

/* Open (create, append) the file named by --log; every bd_emit() line is
 * appended to it too, so a scenario script can poll progress. */
static inline void bd_open_log(const char *path)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	if (fd < 0) {
		fprintf(stderr, "%s: cannot open log file '%s': %s\n",
			program_invocation_short_name, path, strerror(errno));
		exit(BD_EXIT_FAIL);
	}
	*bd_log_fd_slot() = fd;
}

static inline void bd_write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return; /* console gone: nothing useful left to do */
		}
		buf += n;
		len -= (size_t)n;
	}
}

/* Print one machine-readable line (a '\n' is appended). */
__attribute__((format(printf, 1, 2)))
static inline void bd_emit(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	size_t len = (size_t)n;
	if (len > sizeof(line) - 2)
		len = sizeof(line) - 2;
	line[len++] = '\n';
	bd_write_all(STDOUT_FILENO, line, len);
	int lfd = *bd_log_fd_slot();
	if (lfd >= 0)
		bd_write_all(lfd, line, len);
}

/* Usage error: message on stderr, hint to --help, exit 2. */
__attribute__((format(printf, 1, 2), noreturn))
static inline void bd_usage_error(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", program_invocation_short_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nTry '%s --help'.\n", program_invocation_short_name);
	exit(BD_EXIT_USAGE);
}

/* Runtime failure: message with strerror(errno) on stderr, exit 1. */
__attribute__((format(printf, 1, 2), noreturn))
static inline void bd_die_errno(const char *fmt, ...)
{
	int saved = errno;
	va_list ap;
	fprintf(stderr, "%s: ", program_invocation_short_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, ": %s\n", strerror(saved));
	exit(BD_EXIT_FAIL);
}

/* Parse a decimal unsigned integer within [min, max] or exit with a usage
 * error naming the option. Rejects signs, blanks, trailing junk, overflow. */
static inline uint64_t bd_parse_u64(const char *opt, const char *s,
				    uint64_t min, uint64_t max)
{
	if (s == NULL || *s < '0' || *s > '9')
		bd_usage_error("%s needs a decimal number, got '%s'", opt,
			       s ? s : "");
	errno = 0;
	char *end = NULL;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0')
		bd_usage_error("%s needs a decimal number, got '%s'", opt, s);
	if (v < min || v > max)
		bd_usage_error("%s must be between %" PRIu64 " and %" PRIu64
			       ", got %llu", opt, min, max, v);
	return (uint64_t)v;
}

/* Option value of --log (outside the range of option letters). */
#define BD_OPT_LOG 0x100

/* The options every program takes; end each program's option table with it:
 *   static const struct option opts[] = { { "max", ... }, BD_COMMON_OPTIONS };
 * --log FILE   also append every bd_emit() line to FILE
 * --help       print the program's usage and exit 0 */
#define BD_COMMON_OPTIONS                                       \
	{ "log", required_argument, NULL, BD_OPT_LOG },         \
	{ "help", no_argument, NULL, 'h' },                     \
	{ NULL, 0, NULL, 0 }

/* The program's next own option (getopt_long with long options only), or
 * -1 after the last. --log and --help are handled here, and an unknown or
 * incomplete option is a usage error (exit 2), so a program's switch only
 * has cases for its own options. */
static inline int bd_next_option(int argc, char **argv,
				 const struct option *opts,
				 void (*usage)(void))
{
	opterr = 0;
	for (;;) {
		int c = getopt_long(argc, argv, "", opts, NULL);
		switch (c) {
		case BD_OPT_LOG:
			bd_open_log(optarg);
			continue;
		case 'h':
			usage();
			exit(BD_EXIT_OK);
		case '?':
		case ':':
			bd_usage_error("unknown or incomplete option '%s'",
				       argv[optind - 1]);
		default:
			return c;
		}
	}
}

/* After the options, for programs that take no operands. */
static inline void bd_no_operands(int argc, char **argv)
{
	if (optind < argc)
		bd_usage_error("unexpected argument '%s'", argv[optind]);
}

static inline uint64_t bd_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Absolute CLOCK_MONOTONIC deadline `seconds` from now; 0 means "none". */
static inline uint64_t bd_deadline_ns(uint64_t seconds)
{
	return seconds ? bd_now_ns() + seconds * 1000000000ull : 0;
}

static inline int bd_deadline_passed(uint64_t deadline_ns)
{
	return deadline_ns != 0 && bd_now_ns() >= deadline_ns;
}

static inline void bd_sleep_ms(uint64_t ms)
{
	struct timespec ts = {
		.tv_sec = (time_t)(ms / 1000),
		.tv_nsec = (long)(ms % 1000) * 1000000L,
	};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

#endif /* BDPROG_H */
