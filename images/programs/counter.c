/* counter: a page a host can find in guest physical memory and watch.
 *
 * Layout of the page (one anonymous, mlocked page):
 *   offset  0: 16 bytes magic "BDCOUNTER-MAGIC!"
 *   offset 16: u64 little-endian, the pid
 *   offset 24: u64 little-endian, a counter incremented forever
 * A host finds the page at the physical address the program prints (or scans
 * guest RAM for the magic), checks the pid, and watches the counter advance (it
 * stops advancing while the vCPUs are paused). mlock keeps it from being
 * swapped, not from being migrated: a host checks the magic before it trusts
 * an address.
 *
 * The magic is stored XOR-encoded in this binary and decoded straight into
 * the page, so the plain 16 bytes exist only in that page, not in the page
 * cache copy of /bin/counter.
 */
#define _GNU_SOURCE
#include "bdprog.h"

#include <sched.h>
#include <sys/mman.h>

#define MAGIC_LEN 16
#define MAGIC_KEY 0x5a
#define YIELD_MASK ((1ull << 20) - 1)
#define DEADLINE_MASK ((1ull << 24) - 1)

/* "BDCOUNTER-MAGIC!" with every byte XORed with MAGIC_KEY. */
static const unsigned char magic_enc[MAGIC_LEN] = {
	'B' ^ MAGIC_KEY, 'D' ^ MAGIC_KEY, 'C' ^ MAGIC_KEY, 'O' ^ MAGIC_KEY,
	'U' ^ MAGIC_KEY, 'N' ^ MAGIC_KEY, 'T' ^ MAGIC_KEY, 'E' ^ MAGIC_KEY,
	'R' ^ MAGIC_KEY, '-' ^ MAGIC_KEY, 'M' ^ MAGIC_KEY, 'A' ^ MAGIC_KEY,
	'G' ^ MAGIC_KEY, 'I' ^ MAGIC_KEY, 'C' ^ MAGIC_KEY, '!' ^ MAGIC_KEY,
};

static void usage(void)
{
	printf("Usage: counter [--seconds N] [--log FILE]\n"
	       "\n"
	       "Maps and mlocks one page: at offset 0 the 16-byte magic (BDCOUNTER,\n"
	       "a dash, MAGIC!), at 16 the pid (u64 LE), at 24 a u64 LE counter that\n"
	       "is incremented forever (sched_yield every 2^20 increments).\n"
	       "  --seconds N  exit after N seconds (default: run forever)\n"
	       "  --log FILE   also append the output lines to FILE\n"
	       "  --help       show this help\n"
	       "\n"
	       "Output (stdout):\n"
	       "  COUNTER ready pid=<pid> phys=<0x guest-physical address of the page, 0 if unknown>\n");
}

/* The page's guest-physical address from /proc/self/pagemap (bits 0-54 of the entry are the
 * frame number when bit 63, present, is set; root sees real frame numbers), or 0 if unknown. */
static uint64_t phys_addr(const void *addr, size_t page)
{
	uint64_t entry = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		return 0;
	off_t off = (off_t)((uintptr_t)addr / page * sizeof(entry));
	ssize_t n = pread(fd, &entry, sizeof(entry), off);
	close(fd);
	if (n != (ssize_t)sizeof(entry) || !(entry >> 63))
		return 0;
	return (entry & ((1ull << 55) - 1)) * page;
}

static void store_u64_le(volatile unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

int main(int argc, char **argv)
{
	uint64_t seconds = 0;

	static const struct option opts[] = {
		{ "seconds", required_argument, NULL, 's' },
		BD_COMMON_OPTIONS,
	};
	int c;
	while ((c = bd_next_option(argc, argv, opts, usage)) != -1) {
		switch (c) {
		case 's':
			seconds = bd_parse_u64("--seconds", optarg, 1, 31536000);
			break;
		}
	}
	bd_no_operands(argc, argv);

	const size_t page = (size_t)sysconf(_SC_PAGESIZE);
	unsigned char *mem = mmap(NULL, page, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		bd_die_errno("mmap");
	if (mlock(mem, page) != 0)
		fprintf(stderr, "counter: warning: mlock failed (%s); the page may move or be swapped\n",
			strerror(errno));

	volatile unsigned char *vpage = mem;
	const pid_t pid = getpid();
	volatile unsigned char key = MAGIC_KEY; /* keep the decode at run time */
	for (int i = 0; i < MAGIC_LEN; i++)
		vpage[i] = magic_enc[i] ^ key;
	store_u64_le(vpage + 16, (uint64_t)pid);
	store_u64_le(vpage + 24, 0);

	const uint64_t deadline = bd_deadline_ns(seconds);
	bd_emit("COUNTER ready pid=%d phys=0x%llx", (int)pid,
		(unsigned long long)phys_addr(mem, page));

	/* x86-64 is little-endian, so the u64 at offset 24 is the LE value. */
	volatile uint64_t *ctr = (volatile uint64_t *)(void *)(mem + 24);
	for (;;) {
		uint64_t v = *ctr + 1;
		*ctr = v;
		if ((v & YIELD_MASK) == 0) {
			sched_yield();
			if ((v & DEADLINE_MASK) == 0 && bd_deadline_passed(deadline))
				return BD_EXIT_OK;
		}
	}
}
