// Experiment (issue 14, item 2): what the copy-on-write variant's pause would
// cost. Write-protecting N scattered pages with userfaultfd (one
// UFFDIO_WRITEPROTECT per page, as the dirty set of an epoch is scattered)
// against copying the same pages, on an ordinary anonymous 256 MiB mapping,
// and one ioctl over the whole mapping. Not part of castor; results in
// docs/benchmarks.md. Build and run (as root: vm.unprivileged_userfaultfd
// is 0 here): gcc -O2 -o /tmp/wp docs/bench/uffd-wp.c && /tmp/wp 1024 && /tmp/wp 16384
#define _GNU_SOURCE
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
int main(int argc,char**argv){
  size_t pages=65536, n=argc>1?atoi(argv[1]):1024; size_t len=pages*4096;
  char*m=mmap(0,len,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  memset(m,1,len);
  int fd=syscall(SYS_userfaultfd,O_CLOEXEC|O_NONBLOCK);
  if(fd<0){perror("userfaultfd");return 1;}
  struct uffdio_api api={.api=UFFD_API,.features=UFFD_FEATURE_PAGEFAULT_FLAG_WP};
  if(ioctl(fd,UFFDIO_API,&api)){perror("api");return 1;}
  struct uffdio_register reg={.range={(unsigned long)m,len},.mode=UFFDIO_REGISTER_MODE_WP};
  if(ioctl(fd,UFFDIO_REGISTER,&reg)){perror("register");return 1;}
  size_t*idx=malloc(n*sizeof(size_t)); srand(1);
  for(size_t i=0;i<n;i++) idx[i]=((size_t)rand()*7919)%pages;
  char*buf=malloc(n*4096);
  for(int rep=0;rep<5;rep++){
    double t0=now();
    for(size_t i=0;i<n;i++){struct uffdio_writeprotect wp={.range={(unsigned long)(m+idx[i]*4096),4096},.mode=UFFDIO_WRITEPROTECT_MODE_WP};
      if(ioctl(fd,UFFDIO_WRITEPROTECT,&wp)){perror("wp");return 1;}}
    double t1=now();
    for(size_t i=0;i<n;i++){struct uffdio_writeprotect wp={.range={(unsigned long)(m+idx[i]*4096),4096},.mode=0};
      if(ioctl(fd,UFFDIO_WRITEPROTECT,&wp)){perror("unwp");return 1;}}
    double t2=now();
    for(size_t i=0;i<n;i++) memcpy(buf+i*4096,m+idx[i]*4096,4096);
    double t3=now();
    // one ioctl over the whole range
    struct uffdio_writeprotect all={.range={(unsigned long)m,len},.mode=UFFDIO_WRITEPROTECT_MODE_WP};
    ioctl(fd,UFFDIO_WRITEPROTECT,&all);
    double t4=now();
    all.mode=0; ioctl(fd,UFFDIO_WRITEPROTECT,&all);
    for(size_t i=0;i<n;i++) m[idx[i]*4096]++;
    printf("n=%zu wp %.0f us (%.2f us/page), un-wp %.0f us, copy %.0f us (%.2f us/page), wp of all %zu MiB %.0f us\n",n,t1-t0,(t1-t0)/n,t2-t1,t3-t2,(t3-t2)/n,len>>20,t4-t3);
  }
  return 0;
}
