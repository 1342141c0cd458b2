/*
 * socc: a stand-in for TVM's src/support/socket.h: thin POSIX TCP socket wrappers for the RPC
 * client (rpc/rpc_socket_impl.cc). Sockets are plain values: copying one does not duplicate or
 * close the descriptor; Close() does.
 */
#ifndef TVM_SUPPORT_SOCKET_H_
#define TVM_SUPPORT_SOCKET_H_

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <tvm/ffi/error.h>
#include <unistd.h>

#include <cstring>
#include <string>

namespace tvm {
namespace support {

/*! \brief A resolved host and port. */
class SockAddr {
 public:
  SockAddr() = default;
  SockAddr(const char* host, int port) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    std::string service = std::to_string(port);
    int err = getaddrinfo(host, service.c_str(), &hints, &found);
    if (err != 0 || found == nullptr) {
      TVM_FFI_THROW(RuntimeError) << "cannot resolve " << host << ": " << gai_strerror(err);
    }
    std::memcpy(&addr, found->ai_addr, found->ai_addrlen);
    addrlen = found->ai_addrlen;
    freeaddrinfo(found);
  }
  int ss_family() const { return addr.ss_family; }
  /*! \return "host:port" with a numeric host ("[host]:port" for IPv6). */
  std::string AsString() const {
    char host[NI_MAXHOST] = "?", port[NI_MAXSERV] = "?";
    getnameinfo(reinterpret_cast<const sockaddr*>(&addr), addrlen, host, sizeof(host), port,
                sizeof(port), NI_NUMERICHOST | NI_NUMERICSERV);
    std::string h = host;
    return (addr.ss_family == AF_INET6 ? "[" + h + "]" : h) + ":" + port;
  }

  sockaddr_storage addr{};
  socklen_t addrlen = 0;
};

class Socket {
 public:
  using SockType = int;
  static constexpr SockType kInvalid = -1;

  explicit Socket(SockType fd) : sockfd(fd) {}

  /*! \brief Throws an error naming `what` and the current errno. */
  [[noreturn]] static void Error(const char* what) {
    TVM_FFI_THROW(RuntimeError) << "socket error in " << what << ": " << std::strerror(errno);
  }
  /*! \return whether the descriptor is unusable (never opened, closed, or failed). */
  bool BadSocket() const {
    if (sockfd == kInvalid) return true;
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(sockfd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) return true;
    return err == EBADF || err == EINTR;
  }
  void Close() {
    if (sockfd != kInvalid) {
      ::close(sockfd);
      sockfd = kInvalid;
    }
  }

  SockType sockfd;
};

class TCPSocket : public Socket {
 public:
  TCPSocket() : Socket(kInvalid) {}
  explicit TCPSocket(SockType fd) : Socket(fd) {}

  void Create(int family = AF_INET) {
    sockfd = ::socket(family, SOCK_STREAM, 0);
    if (sockfd == kInvalid) Error("socket()");
  }
  bool Connect(const SockAddr& to) {
    return ::connect(sockfd, reinterpret_cast<const sockaddr*>(&to.addr), to.addrlen) == 0;
  }
  /*! \return bytes sent, or -1 on error (a signal interrupting the call is retried). */
  ssize_t Send(const void* data, size_t size) {
    ssize_t n;
    do {
      n = ::send(sockfd, data, size, MSG_NOSIGNAL);
    } while (n == -1 && errno == EINTR);
    return n;
  }
  /*! \return bytes received, 0 at end of stream, or -1 on error. */
  ssize_t Recv(void* data, size_t size) {
    ssize_t n;
    do {
      n = ::recv(sockfd, data, size, 0);
    } while (n == -1 && errno == EINTR);
    return n;
  }
  /*! \brief Sends all bytes; throws on error. */
  size_t SendAll(const void* data, size_t size) {
    const char* p = static_cast<const char*>(data);
    size_t done = 0;
    while (done < size) {
      ssize_t n = Send(p + done, size - done);
      if (n == -1) Error("SendAll");
      done += static_cast<size_t>(n);
    }
    return done;
  }
  /*! \brief Receives until `size` bytes arrived or the peer closed; throws on error. */
  size_t RecvAll(void* data, size_t size) {
    char* p = static_cast<char*>(data);
    size_t done = 0;
    while (done < size) {
      ssize_t n = Recv(p + done, size - done);
      if (n == -1) Error("RecvAll");
      if (n == 0) break;
      done += static_cast<size_t>(n);
    }
    return done;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_SOCKET_H_
