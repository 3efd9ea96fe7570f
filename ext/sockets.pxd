# Socket declarations for the batched UDP path (kept apart from the logic, uvloop-style).
# recvmmsg/sendmmsg are Linux calls; elsewhere the inline C below stubs them to fail with
# ENOSYS and CTMS_HAVE_MMSG is 0, so _udpio takes its plain recvfrom/sendto loop.

cdef extern from *:
    """
    #include <errno.h>
    #include <string.h>
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    #include <netinet/in.h>
    #include <arpa/inet.h>
    #if defined(__linux__)
    #define CTMS_HAVE_MMSG 1
    #else
    #define CTMS_HAVE_MMSG 0
    struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
    static int recvmmsg(int fd, struct mmsghdr *m, unsigned int n, int f, void *t)
    { (void)fd; (void)m; (void)n; (void)f; (void)t; errno = ENOSYS; return -1; }
    static int sendmmsg(int fd, struct mmsghdr *m, unsigned int n, int f)
    { (void)fd; (void)m; (void)n; (void)f; errno = ENOSYS; return -1; }
    #endif
    #ifndef MSG_DONTWAIT
    #define MSG_DONTWAIT 0
    #endif
    #if defined(__linux__)
    #include <netinet/udp.h>
    #ifndef UDP_SEGMENT
    #define UDP_SEGMENT 103
    #endif
    #define CTMS_HAVE_GSO 1
    #else
    #define CTMS_HAVE_GSO 0
    #define UDP_SEGMENT 0
    #endif
    #ifndef SOL_UDP
    #define SOL_UDP 17
    #endif
    /* One UDP_SEGMENT control message (RFC-less Linux UDP GSO): all datagrams of the
       message are seg bytes long except possibly the last. */
    static inline size_t ctms_gso_space(void) { return CMSG_SPACE(sizeof(unsigned short)); }
    static inline void ctms_set_gso(struct msghdr *m, char *buf, unsigned short seg) {
        struct cmsghdr *c;
        m->msg_control = buf;
        m->msg_controllen = CMSG_SPACE(sizeof(unsigned short));
        c = CMSG_FIRSTHDR(m);
        c->cmsg_level = SOL_UDP;
        c->cmsg_type = UDP_SEGMENT;
        c->cmsg_len = CMSG_LEN(sizeof(unsigned short));
        memcpy(CMSG_DATA(c), &seg, sizeof(seg));
    }
    """
    const int CTMS_HAVE_MMSG
    const int CTMS_HAVE_GSO
    const int UDP_SEGMENT


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EWOULDBLOCK
        EINTR
        ENOSYS


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct iovec:
        void *iov_base
        size_t iov_len

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    enum:
        AF_INET
        AF_INET6
        MSG_DONTWAIT
        MSG_TRUNC

    ssize_t recvfrom(int fd, void *buf, size_t n, int flags, sockaddr *addr,
                     socklen_t *addrlen)
    ssize_t sendto(int fd, const void *buf, size_t n, int flags, const sockaddr *addr,
                   socklen_t addrlen)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int recvmmsg(int fd, mmsghdr *msgs, unsigned int n, int flags, void *timeout)
    int sendmmsg(int fd, mmsghdr *msgs, unsigned int n, int flags)


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        unsigned int s_addr

    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr

    struct in6_addr:
        unsigned char s6_addr[16]

    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id

    unsigned short htons(unsigned short v)
    unsigned short ntohs(unsigned short v)


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)


cdef extern from * nogil:
    size_t ctms_gso_space()
    void ctms_set_gso(msghdr *m, char *buf, unsigned short seg)
