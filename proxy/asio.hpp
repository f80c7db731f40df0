// The one way pgwarden includes Boost.Asio. Boost 1.74's coroutine support uses
// std::exchange without including <utility>, which GCC 12 rejects; including it first
// here keeps every translation unit compiling.
#pragma once
#include <utility>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>

namespace pgwarden::proxy {
namespace asio = boost::asio;
using asio::awaitable;
using asio::ip::tcp;
}  // namespace pgwarden::proxy
